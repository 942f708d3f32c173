"""Adapters: the paper's benchmarks, read from the files each one distributes, as `EvalItem`s.

    name           --data                                          metric, task(s)
    vqav2, okvqa   folder with *questions*.json + *annotations*.json  VQA accuracy
                   (VQA format), COCO images under val2014/ (or the folder, images/)
    textvqa        TextVQA_0.5.1_val.json, images train_images/{image_id}.jpg   VQA accuracy
    vizwiz         val.json (a list, answers inside), images val/{image}        VQA accuracy
    coco, nocaps   COCO-format captions JSON ("images" + "annotations"):         CIDEr
                   captions_val2014.json / Karpathy test, nocaps_val_4500_captions.json (domain per image)
    textcaps       TextCaps_0.1_val.json ("data" rows with reference_strs) or COCO format   CIDEr
    pope           coco_pope_{random,popular,adversarial}.json (JSON lines), or a folder of them;
                   one task per file ("pope-adversarial", ...)                  POPE
    mmbench        MMBench_DEV_EN.tsv (options A-D, hint, base64 images)        multiple choice (+ circular)
    seedbench      SEED-Bench.json + SEED-Bench-image/ (image questions only)   multiple choice
    scienceqa      folder with problems.json + pid_splits.json + images/{split}/{pid}/image.png
    scienceqa-img  the same, only the questions with an image (LLaVA's SQA-IMG)  multiple choice
    mmmu           validation parquet files (a file or a folder of subjects) or JSON rows;
                   `<image k>` placeholders become `<image>`                     multiple choice / exact match
    synthetic      blip3's synthetic world (LLaVA JSON, see synthetic.py)        per task

Image paths are looked up under `image_root` first (when given), then beside the data files. Every
image is located when the benchmark is loaded, so a missing file fails at once, with its name.
"""

from __future__ import annotations

import ast
import base64
import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from blip3.evaluation import prompts
from blip3.evaluation.items import (
    CIDER,
    EXACT_MATCH,
    MULTIPLE_CHOICE,
    OPTION_LETTERS,
    POPE,
    VQA_ACCURACY,
    EvalItem,
)
from blip3.evaluation.synthetic import load_synthetic
from blip3.processing.tokenizer import IMAGE_TOKEN

# ---------------------------------------------------------------------------------------------------
# Files


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _read_json_lines(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _find_file(path: Path, patterns: Sequence[str], what: str) -> Path:
    """`path` itself if it is a file, else the single file in the folder `path` matching a pattern."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    for pattern in patterns:
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{path} holds several {what} files ({', '.join(f.name for f in found)}); name one")
    raise FileNotFoundError(f"no {what} file ({' or '.join(patterns)}) in {path}")


def _find_image(names: Iterable[str], roots: Iterable[Path | None]) -> Path:
    """The first of `names` that exists under one of `roots` (in that order)."""
    tried = []
    for root in roots:
        if root is None:
            continue
        for name in names:
            candidate = root / name
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(f"image not found; looked for {', '.join(tried[:6])}{' ...' if len(tried) > 6 else ''}")


# ---------------------------------------------------------------------------------------------------
# VQA-style: VQAv2, OK-VQA, TextVQA, VizWiz


def load_vqa(path: Path, task: str = "vqav2", image_root: Path | None = None) -> list[EvalItem]:
    """VQA-format questions + annotations (VQAv2, OK-VQA); images named COCO_{subtype}_{id:012d}.jpg."""
    folder = path if path.is_dir() else path.parent
    questions_file = _find_file(path, ["*questions*.json"], "questions")
    annotations_file = _find_file(folder, ["*annotations*.json"], "annotations")
    questions = _read_json(questions_file)
    subtype = questions.get("data_subtype", "val2014")
    annotations = {a["question_id"]: a for a in _read_json(annotations_file)["annotations"]}
    roots = (image_root, folder / subtype, folder / "images", folder, folder.parent / subtype)
    items = []
    for q in questions["questions"]:
        annotation = annotations.get(q["question_id"])
        if annotation is None:
            raise ValueError(f"{annotations_file} has no answers for question {q['question_id']}")
        image_names = (f"COCO_{subtype}_{q['image_id']:012d}.jpg", f"{q['image_id']:012d}.jpg")
        items.append(
            EvalItem(
                id=str(q["question_id"]),
                task=task,
                metric=VQA_ACCURACY,
                prompt=prompts.short_answer_prompt(q["question"]),
                images=[_find_image(image_names, roots)],
                references=[a["answer"] for a in annotation["answers"]],
                question=q["question"],
                category=annotation.get("answer_type"),
            )
        )
    return items


def load_textvqa(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """TextVQA's own JSON ({"data": [{question_id, question, image_id, answers: [10 strings]}]})."""
    file = _find_file(path, ["TextVQA_*val*.json", "TextVQA_*.json"], "TextVQA")
    roots = (image_root, file.parent / "train_images", file.parent / "images", file.parent)
    items = []
    for row in _read_json(file)["data"]:
        if not row.get("answers"):
            raise ValueError(f"{file}: question {row['question_id']} has no answers (a test split?)")
        items.append(
            EvalItem(
                id=str(row["question_id"]),
                task="textvqa",
                metric=VQA_ACCURACY,
                prompt=prompts.short_answer_prompt(row["question"]),
                images=[_find_image([f"{row['image_id']}.jpg"], roots)],
                references=list(row["answers"]),
                question=row["question"],
            )
        )
    return items


def load_vizwiz(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """VizWiz-VQA's annotation list ([{image, question, answers: [{answer, answer_confidence}], answer_type}])."""
    file = _find_file(path, ["val.json", "*.json"], "VizWiz annotations")
    split = file.stem  # "val" -> images in val/
    roots = (image_root, file.parent / split, file.parent.parent / split, file.parent / "images", file.parent)
    items = []
    for row in _read_json(file):
        if not row.get("answers"):
            raise ValueError(f"{file}: {row['image']} has no answers (a test split?)")
        question = row["question"]
        items.append(
            EvalItem(
                id=row["image"],
                task="vizwiz",
                metric=VQA_ACCURACY,
                prompt=prompts.short_answer_prompt(
                    question, instruction=f"{prompts.UNANSWERABLE_INSTRUCTION}\n{prompts.SHORT_ANSWER_INSTRUCTION}"
                ),
                images=[_find_image([row["image"]], roots)],
                references=[a["answer"] for a in row["answers"]],
                question=question,
                category=row.get("answer_type"),
            )
        )
    return items


# ---------------------------------------------------------------------------------------------------
# Captions: COCO, NoCaps, TextCaps


def load_captions(path: Path, task: str = "coco", image_root: Path | None = None) -> list[EvalItem]:
    """A COCO-format caption file ("images" + "annotations"), or TextCaps' own ("data" with reference_strs)."""
    file = _find_file(path, ["*captions*.json", "*.json"], "captions")
    data = _read_json(file)
    roots = (image_root, file.parent, file.parent / "images", file.parent / "val2014", file.parent / "validation")
    if "data" in data:  # TextCaps' native layout: one row per caption, each row listing all references
        return _textcaps_native(data["data"], task, roots + (file.parent / "train_images",))
    references: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    items = []
    for image in data["images"]:
        if image["id"] not in references:
            continue  # an image without reference captions cannot be scored
        items.append(
            EvalItem(
                id=str(image["id"]),
                task=task,
                metric=CIDER,
                prompt=prompts.caption_prompt(),
                images=[_find_image([image["file_name"]], roots)],
                references=references[image["id"]],
                category=image.get("domain"),  # NoCaps: in-domain / near-domain / out-domain
            )
        )
    return items


def _textcaps_native(rows: list[dict], task: str, roots: tuple) -> list[EvalItem]:
    by_image: dict[str, dict] = {}
    for row in rows:
        entry = by_image.setdefault(row["image_id"], {"row": row, "captions": []})
        if "caption_str" in row:
            entry["captions"].append(row["caption_str"])
    items = []
    for image_id, entry in by_image.items():
        row = entry["row"]
        references = list(row.get("reference_strs") or entry["captions"])
        if not references:
            raise ValueError(f"TextCaps image {image_id} has no reference captions (a test split?)")
        names = [name for name in (row.get("image_path"), f"{image_id}.jpg") if name]
        items.append(
            EvalItem(
                id=str(image_id),
                task=task,
                metric=CIDER,
                prompt=prompts.caption_prompt(),
                images=[_find_image(names, roots)],
                references=references,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------------
# POPE


def load_pope(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """POPE's JSON-lines files ({question_id, image, text | question, label}); one task per file."""
    # POPE's names: coco_pope_{random,popular,adversarial}.json (JSON lines despite the suffix)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*pope_*.json*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no POPE files (*pope_<variant>.json or .jsonl) in {path}")
    items = []
    for file in files:
        variant = file.stem.split("_")[-1]  # coco_pope_adversarial -> adversarial
        # COCO's val2014 beside the file, or an images/ folder beside it or above it (blip3's world)
        above = [folder / "images" for folder in list(file.absolute().parents)[1:4]]
        roots = (image_root, file.parent, file.parent / "val2014", file.parent / "images", *above)
        for row in _read_json_lines(file):
            question = row.get("text", row.get("question"))
            items.append(
                EvalItem(
                    id=f"{variant}-{row['question_id']}",
                    task=f"pope-{variant}",
                    metric=POPE,
                    prompt=prompts.short_answer_prompt(question),
                    images=[_find_image([row["image"]], roots)],
                    references=[str(row["label"]).strip().lower()],
                    question=question,
                )
            )
    return items


# ---------------------------------------------------------------------------------------------------
# Multiple choice: MMBench, SEED-Bench, ScienceQA, MMMU


def _multiple_choice_item(
    id: str,
    task: str,
    question: str,
    choices: list[str],
    answer: str,
    images: list,
    hint: str | None = None,
    category: str | None = None,
    group: str | None = None,
) -> EvalItem:
    hint_line = f"{hint}\n" if hint else ""
    return EvalItem(
        id=id,
        task=task,
        metric=MULTIPLE_CHOICE,
        prompt=prompts.multiple_choice_prompt(question, choices, hint, num_images=len(images)),
        images=images,
        references=[answer],
        question=f"{hint_line}{question}\n{prompts.format_options(choices)}",
        choices=choices,
        category=category,
        group=group,
    )


def _present(value: Any) -> bool:
    """A TSV cell that holds something (pandas writes missing cells as "" or "nan")."""
    return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


def load_mmbench(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """MMBench's TSV: index, question, hint, A..D, answer, category, image (base64), ..."""
    file = _find_file(path, ["MMBench*.tsv", "*.tsv"], "MMBench TSV")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with open(file, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and "answer" not in rows[0]:
        raise ValueError(f"{file} has no answer column (a test split?)")
    # Rows may share an image by naming another row's index in their image cell (as VLMEvalKit reads them).
    images_by_index = {row["index"]: row["image"] for row in rows}
    circular = any(int(row["index"]) >= 1_000_000 for row in rows)
    items = []
    for row in rows:
        image = row["image"]
        while len(image) <= 64 and image in images_by_index:
            image = images_by_index[image]
        choices = [row[letter] for letter in OPTION_LETTERS if letter in row and _present(row[letter])]
        items.append(
            _multiple_choice_item(
                id=row["index"],
                task="mmbench",
                question=row["question"],
                choices=choices,
                answer=row["answer"].strip(),
                images=[base64.b64decode(image)],
                hint=row["hint"] if _present(row.get("hint")) else None,
                category=row.get("category") or None,
                # the circular copies of a question have indices i + k·10⁶
                group=str(int(row["index"]) % 1_000_000) if circular else None,
            )
        )
    return items


def load_seedbench(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """SEED-Bench's JSON ({"questions": [{question_id, question, choice_a..d, answer, data_id, data_type}]})."""
    file = _find_file(path, ["SEED-Bench*.json", "*.json"], "SEED-Bench")
    data = _read_json(file)
    type_names = {number: name for name, number in data.get("question_type", {}).items()}
    roots = (image_root, file.parent / "SEED-Bench-image", file.parent)
    items = []
    for row in data["questions"]:
        if row.get("data_type", "image") != "image":
            continue  # SEED-IMG: the video questions are a different benchmark
        data_id = row["data_id"]
        items.append(
            _multiple_choice_item(
                id=str(row["question_id"]),
                task="seedbench",
                question=row["question"],
                choices=[row[f"choice_{letter}"] for letter in "abcd"],
                answer=row["answer"].strip(),
                images=[_find_image([data_id, f"{data_id}.jpg", f"{data_id}.png"], roots)],
                category=type_names.get(row.get("question_type_id")),
            )
        )
    return items


def load_scienceqa(
    path: Path, image_root: Path | None = None, split: str = "test", with_image_only: bool = False
) -> list[EvalItem]:
    """ScienceQA's problems.json + pid_splits.json; a problem's image is images/{split}/{pid}/image.png."""
    folder = path if path.is_dir() else path.parent
    problems = _read_json(_find_file(folder, ["problems.json"], "ScienceQA problems"))
    pids = _read_json(_find_file(folder, ["pid_splits.json"], "ScienceQA splits"))[split]
    roots = (image_root, folder / "images" / split, folder / split, folder / "images", folder)
    items = []
    for pid in pids:
        problem = problems[pid]
        if with_image_only and not problem.get("image"):
            continue
        images = [_find_image([f"{pid}/{problem['image']}"], roots)] if problem.get("image") else []
        hint = problem.get("hint")
        items.append(
            _multiple_choice_item(
                id=str(pid),
                task="scienceqa-img" if with_image_only else "scienceqa",
                question=problem["question"],
                choices=list(problem["choices"]),
                answer=OPTION_LETTERS[problem["answer"]],
                images=images,
                hint=f"Context: {hint}" if hint else None,
                category=problem.get("subject"),
            )
        )
    return items


_MMMU_PLACEHOLDER = re.compile(r"<image (\d+)>")


def load_mmmu(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """MMMU rows (parquet per subject, or JSON): question, options (a Python-literal list), answer,
    question_type, image_1..image_7; `<image k>` placeholders become `<image>`, images in that order."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".json"))
    if not files:
        raise FileNotFoundError(f"no MMMU parquet or JSON files under {path}")
    items = []
    for file in files:
        for row in _mmmu_rows(file):
            items.append(_mmmu_item(row, file.parent, image_root))
    return items


def _mmmu_rows(file: Path) -> list[dict]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file).to_pylist()
    data = _read_json(file)
    return data if isinstance(data, list) else [data]


def _mmmu_item(row: dict, folder: Path, image_root: Path | None) -> EvalItem:
    images: list = []

    def take_image(match: re.Match) -> str:
        images.append(_mmmu_image(row, int(match.group(1)), folder, image_root))
        return IMAGE_TOKEN

    options = _literal_list(row.get("options"))
    is_choice = row.get("question_type", "multiple-choice") == "multiple-choice" and bool(options)
    body = row["question"] + (f"\n{prompts.format_options(options)}" if is_choice else "")
    body = _MMMU_PLACEHOLDER.sub(take_image, body)
    referenced = set(map(int, _MMMU_PLACEHOLDER.findall(row["question"] + " ".join(options))))
    # Images the text never points at are placed first, so every image is seen.
    unplaced = [k for k in range(1, 8) if row.get(f"image_{k}") is not None and k not in referenced]
    images = [_mmmu_image(row, k, folder, image_root) for k in unplaced] + images
    subject = re.sub(r"^(validation|dev|test)_|_\d+$", "", str(row["id"]))
    instruction = prompts.MULTIPLE_CHOICE_INSTRUCTION if is_choice else prompts.SHORT_ANSWER_INSTRUCTION
    common = dict(
        id=str(row["id"]),
        task="mmmu",
        prompt=f"{prompts.image_prefix(len(unplaced))}{body}\n{instruction}",
        images=images,
        question=body,
        category=subject,
    )
    if is_choice:
        choices = [_MMMU_PLACEHOLDER.sub(IMAGE_TOKEN, option) for option in options]
        return EvalItem(metric=MULTIPLE_CHOICE, references=[str(row["answer"]).strip()], choices=choices, **common)
    answers = _literal_list(row["answer"]) if str(row["answer"]).startswith("[") else [str(row["answer"])]
    return EvalItem(metric=EXACT_MATCH, references=answers, **common)


def _literal_list(value: Any) -> list[str]:
    """MMMU stores lists as Python literals ("['a', 'b']"); read them without evaluating code."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(v) for v in ast.literal_eval(value)]


def _mmmu_image(row: dict, number: int, folder: Path, image_root: Path | None):
    value = row.get(f"image_{number}")
    if value is None:
        raise ValueError(f"MMMU question {row['id']} refers to <image {number}>, which it does not have")
    if isinstance(value, dict):  # the parquet struct {bytes, path}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return _find_image([value], (image_root, folder, folder / "images"))


# ---------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[..., list[EvalItem]]  # (path, image_root=None) -> items
    description: str


BENCHMARKS = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark("vqav2", partial(load_vqa, task="vqav2"), "VQAv2 questions + annotations (VQA format)"),
        Benchmark("okvqa", partial(load_vqa, task="okvqa"), "OK-VQA questions + annotations (VQA format)"),
        Benchmark("textvqa", load_textvqa, "TextVQA_0.5.1_val.json"),
        Benchmark("vizwiz", load_vizwiz, "VizWiz-VQA val.json"),
        Benchmark("coco", partial(load_captions, task="coco"), "COCO-format caption JSON"),
        Benchmark("nocaps", partial(load_captions, task="nocaps"), "nocaps_val_4500_captions.json"),
        Benchmark("textcaps", partial(load_captions, task="textcaps"), "TextCaps_0.1_val.json or COCO format"),
        Benchmark("pope", load_pope, "coco_pope_<variant>.json files (JSON lines)"),
        Benchmark("mmbench", load_mmbench, "MMBench TSV"),
        Benchmark("seedbench", load_seedbench, "SEED-Bench.json, image questions"),
        Benchmark("scienceqa", load_scienceqa, "ScienceQA problems.json + pid_splits.json, test split"),
        Benchmark(
            "scienceqa-img", partial(load_scienceqa, with_image_only=True), "ScienceQA test questions with an image"
        ),
        Benchmark("mmmu", load_mmmu, "MMMU validation parquet or JSON"),
        Benchmark("synthetic", load_synthetic, "blip3's synthetic world (LLaVA JSON)"),
    )
}


def load_benchmark(name: str, path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """The items of benchmark `name` read from `path` (see the table at the top of this module)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name].load(Path(path), image_root=Path(image_root) if image_root is not None else None)
