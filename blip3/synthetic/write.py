"""Writing the world to disk in the formats of real data, so the demo goes through the real readers.

    <out>/
      manifest.json                      counts per split and task, every path, the world's parameters
      stage0.yaml pretrain.yaml sft.yaml multi_image_sft.yaml dpo.yaml safety.yaml
                                         one mixture per training stage (paths relative to the yaml)
      tokenizer/                         the world's tokenizer, transformers format (see tokenizer.py)
      pretrain/captions/train-000000.tar …      webdataset: <key>.png <key>.txt <key>.json
      pretrain/captions/validation-000000.tar   validation pairs (stage 0's retrieval and patch probe)
      pretrain/interleaved/train-000000.tar …   webdataset: <key>.json {"texts", "images"}, <key>.0.png …
      pretrain/ocr/train-000000.tar …           webdataset: <key>.png <key>.json {"ocr": [{text, box}], "caption"}
      pretrain/grounding/train-000000.tar …     webdataset: <key>.png <key>.json {"caption", "objects": [{phrase, box}]}
      sft/single.json sft/multi.json sft/safety.json      LLaVA json lists
      preference/train.jsonl preference/validation.jsonl  {"id", "images", "prompt", "chosen", "rejected", …}
      eval/{validation,test}/single.json multi.json pope.json safety.json   LLaVA json, one question each
      eval/{validation,test}/pope_{random,popular,adversarial}.jsonl        POPE's own file format
      images/{train,validation,test}/<group>/*.png   the images the json files name (relative to images/)

Boxes are normalized [x1, y1, x2, y2] with (x1, y1) the top-left corner. LLaVA records carry, besides
`id`, `image` and `conversations`, the metadata evaluation needs: `task`, `answer` (canonical), `box`
(grounding), `split`, `held_out` (the question names a held-out colour × shape pair), `safe` (safety),
`facets` (single-image evaluation records: {"shapes": how many the image holds}).
Training conversations may hold several questions about their images; `turns` lists each one's task
and answer, and `task`/`answer` are the first's. Evaluation records hold exactly one question.

Each part of the world draws from its own `random.Random` seeded by (seed, part), so the output is a
pure function of the seed and the sizes, and the parts can be written in parallel processes.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from tqdm import tqdm
from webdataset import TarWriter

from blip3.processing.chat import XGENMM_SYSTEM_PROMPT
from blip3.synthetic import tasks
from blip3.synthetic.render import encode_png, render_scene
from blip3.synthetic.tasks import QA
from blip3.synthetic.world import Scene, WorldSpec, sample_scene

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class WorldSizes:
    """How many samples of each kind to write. `demo()` is the default recipe's; `smoke()` is for tests."""

    captions: int = 4000
    caption_validation: int = 256
    tags: int = 14400  # tag lists of new scenes: one pass of `blip3 demo --tags`'s stage (900 steps of 16); 0: none
    interleaved: int = 600
    ocr: int = 1500
    grounding: int = 1500
    sft_single: int = 3000  # conversations of `min_turns` to `max_turns` questions
    sft_multi: int = 1500  # conversations of up to `multi_turns` questions (see `part_sft_multi`)
    sft_safety: int = 600
    preference: int = 600  # images, each with a caption pair and a yes/no existence pair
    preference_validation: int = 100  # images, as `preference`
    validation_per_task: int = 30  # single- and multi-image evaluation questions per task
    test_per_task: int = 100
    pope_validation_per_category: int = 20  # images; each gives one "yes" and one "no" question
    pope_test_per_category: int = 50
    safety_validation: int = 60
    safety_test: int = 200
    min_turns: int = 3  # 3–6 rather than 1–3: more answers per image for a little more compute; after SFT
    max_turns: int = 6  # from the same pre-trained model, caption CIDEr 326 vs 188, position 27 vs 15 %
    multi_turns: int = 4  # 1 before: 3.8 answers per set of images now; no clear gain (docs/demo-findings.md)
    text_rate: float = 0.5  # share of single-image scenes with a string of text
    # Share of pre-training caption and SFT scenes that also show a hazard sign, asked about as ordinary
    # images are (web and instruction data hold warning signs too). Without them the model first met the
    # sign in safety tuning: the SFT model counted it as a shape (59 % of counts right on those images,
    # nearly every error one too many), and safety tuning then taught it to count one fewer everywhere
    # (counting 85 -> 72 %; docs/demo-findings.md).
    hazard_rate: float = 0.1
    shard_size: int = 1000

    @classmethod
    def demo(cls) -> WorldSizes:
        return cls()

    @classmethod
    def smoke(cls) -> WorldSizes:
        return cls(
            captions=48,
            caption_validation=16,
            tags=16,
            interleaved=8,
            ocr=12,
            grounding=12,
            sft_single=24,
            sft_multi=12,
            sft_safety=12,
            preference=12,
            preference_validation=4,
            validation_per_task=2,
            test_per_task=3,
            pope_validation_per_category=2,
            pope_test_per_category=2,
            safety_validation=4,
            safety_test=6,
            shard_size=20,
        )


@dataclass
class PartResult:
    """What writing one part produced: its files, its question counts, and its text (for the tokenizer)."""

    name: str
    files: dict[str, list | dict] = field(default_factory=dict)  # manifest key -> paths relative to the root
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> task -> questions
    texts: list[str] = field(default_factory=list)
    num_images: int = 0


# ---------------------------------------------------------------------------------------------------
# Low-level writers


class ImageFolder:
    """Renders scenes into `images/<split>/<group>/NAME.png` and returns paths relative to `images/`."""

    def __init__(self, root: Path, split: str, group: str):
        self.root = root / "images"
        self.prefix = f"{split}/{group}"
        (self.root / self.prefix).mkdir(parents=True, exist_ok=True)
        self.count = 0

    def save(self, scene: Scene, name: str) -> str:
        relative = f"{self.prefix}/{name}.png"
        (self.root / relative).write_bytes(encode_png(render_scene(scene)))
        self.count += 1
        return relative


def write_shards(root: Path, prefix: str, samples: Iterable[dict], shard_size: int) -> list[str]:
    """Webdataset tar shards `<prefix>-000000.tar`, … of `shard_size` samples; returns their relative paths.

    Each sample maps `__key__` and member extensions to bytes or str. Member times are fixed, so a
    shard's bytes depend on its samples only.
    """
    paths, writer, count = [], None, 0
    for sample in samples:
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
            relative = f"{prefix}-{len(paths):06d}.tar"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            writer = TarWriter(str(root / relative), mtime=0, encoder=False)
            paths.append(relative)
            count = 0
        members = {name: value.encode() if isinstance(value, str) else value for name, value in sample.items()}
        writer.write(members | {"__key__": sample["__key__"]})  # the key stays a str
        count += 1
    if writer is not None:
        writer.close()
    return paths


def write_json_list(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line (valid JSON, readable, diff-friendly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{lines}\n]\n" if records else "[]\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def conversation_record(
    record_id: str, image: str | list[str], turns: list[tuple[str, QA]], split: str, held_out: set
) -> dict:
    """A LLaVA record: `turns` are (human text with <image>, QA) pairs; metadata from the first QA."""
    first = turns[0][1]
    record = {
        "id": record_id,
        "image": image,
        "conversations": [
            message
            for human, qa in turns
            for message in ({"from": "human", "value": human}, {"from": "gpt", "value": qa.response})
        ],
        "task": first.task,
        "answer": first.answer,
        "split": split,
        "held_out": any(qa.names_any(held_out) for _, qa in turns),
    }
    if first.box is not None:
        record["box"] = list(first.box)
    if len(turns) > 1:
        record["turns"] = [
            {"task": qa.task, "answer": qa.answer, **({"box": list(qa.box)} if qa.box is not None else {})}
            for _, qa in turns
        ]
    return record


def _qa_texts(turns: Iterable[tuple[str, QA]]) -> list[str]:
    return [text for human, qa in turns for text in (human.replace("<image>", ""), qa.response)]


# ---------------------------------------------------------------------------------------------------
# The parts of the world


@dataclass(frozen=True)
class _Job:
    root: Path
    spec: WorldSpec
    sizes: WorldSizes
    seed: int

    def rng(self, part: str) -> random.Random:
        return random.Random(f"{self.seed}:{part}")  # str seeds hash with SHA-512: stable across runs

    @property
    def held_out(self) -> frozenset:
        return frozenset(self.spec.held_out_pairs)


def ordinary_scene(rng: random.Random, spec: WorldSpec, text_rate: float, hazard_rate: float = 0.0) -> Scene:
    """A scene that holds a string (of a random size) with probability `text_rate`, a hazard sign with
    probability `hazard_rate`."""
    hazard = rng.random() < hazard_rate if hazard_rate else False  # no draw at rate 0: scenes as before
    return sample_scene(rng, spec, text="mixed" if rng.random() < text_rate else None, hazard=hazard)


def part_captions(job: _Job, split: str) -> PartResult:
    rng = job.rng(f"captions/{split}")
    count = job.sizes.captions if split == "train" else job.sizes.caption_validation
    result = PartResult(f"captions/{split}")

    def samples():
        for index in range(count):
            scene = ordinary_scene(rng, job.spec, job.sizes.text_rate, job.sizes.hazard_rate)
            caption = tasks.pretraining_caption(scene, rng)
            result.texts.append(caption)
            meta = {
                "scene": scene.to_dict(),
                "short_caption": tasks.short_caption(scene),
                "dense_caption": tasks.dense_caption(scene),
            }
            yield {
                "__key__": f"{index:07d}",
                "png": encode_png(render_scene(scene)),
                "txt": caption,
                "json": json.dumps(meta),
            }

    result.files[f"captions/{split}"] = write_shards(
        job.root, f"pretrain/captions/{split}", samples(), job.sizes.shard_size
    )
    result.counts[split] = Counter(pretrain_captions=count)
    result.num_images = count
    return result


def part_tags(job: _Job) -> PartResult:
    """Tag lists of new scenes ('Shapes: star green, circle red.'), the caption format's samples.

    The only text of the world that names a shape right before its colour: pre-trained on them, the
    model learns to find an object by its shape, which colour questions need (`tasks.tag_caption`).
    Their words are the other texts' words, and they are kept out of the tokenizer's training text: a world
    with tags then differs from one without only by these files and SFT's mixture (which replays them), so
    `blip3 demo --tags` runs the default demo's stage 0 and pre-training to the bit, and the two runs compare
    stage by stage.
    The same images are written again with lists that also name an absent pair (`tasks.absent_tag_caption`,
    `pretrain/tags-absent/`), for SFT to replay.
    """
    rng, absent_rng = job.rng("tags"), job.rng("tags/absent")  # the plain lists do not depend on the other
    result = PartResult("tags")
    with_absent = []

    def samples():
        for index in range(job.sizes.tags):
            scene = ordinary_scene(rng, job.spec, job.sizes.text_rate, job.sizes.hazard_rate)
            caption = tasks.tag_caption(scene, rng)
            sample = {
                "__key__": f"{index:07d}",
                "png": encode_png(render_scene(scene)),
                "txt": caption,
                "json": json.dumps({"scene": scene.to_dict()}),
            }
            with_absent.append(sample | {"txt": tasks.absent_tag_caption(scene, caption, absent_rng)})
            yield sample

    if job.sizes.tags:
        result.files["tags"] = write_shards(job.root, "pretrain/tags/train", samples(), job.sizes.shard_size)
        result.files["tags_absent"] = write_shards(
            job.root, "pretrain/tags-absent/train", with_absent, job.sizes.shard_size
        )
    result.counts["train"] = Counter(pretrain_tags=job.sizes.tags)
    result.num_images = job.sizes.tags
    return result


def part_interleaved(job: _Job) -> PartResult:
    rng = job.rng("interleaved")
    result = PartResult("interleaved")

    def samples():
        for index in range(job.sizes.interleaved):
            scenes, texts, image_slots = tasks.interleaved_document(rng, job.spec)
            result.texts += [t for t in texts if t is not None]
            result.num_images += len(scenes)
            names = [None if slot is None else f"{slot}.png" for slot in image_slots]
            sample = {"__key__": f"{index:07d}", "json": json.dumps({"texts": texts, "images": names})}
            sample |= {f"{k}.png": encode_png(render_scene(scene)) for k, scene in enumerate(scenes)}
            yield sample

    result.files["interleaved"] = write_shards(job.root, "pretrain/interleaved/train", samples(), job.sizes.shard_size)
    result.counts["train"] = Counter(pretrain_interleaved=job.sizes.interleaved)
    return result


def part_ocr(job: _Job) -> PartResult:
    rng = job.rng("ocr")
    result = PartResult("ocr")

    def samples():
        for index in range(job.sizes.ocr):
            scene = tasks.ocr_scene(rng, job.spec)
            annotation = tasks.ocr_annotation(scene)
            result.texts.append(annotation["caption"])
            yield {"__key__": f"{index:07d}", "png": encode_png(render_scene(scene)), "json": json.dumps(annotation)}

    result.files["ocr"] = write_shards(job.root, "pretrain/ocr/train", samples(), job.sizes.shard_size)
    result.counts["train"] = Counter(pretrain_ocr=job.sizes.ocr)
    result.num_images = job.sizes.ocr
    return result


def part_grounding(job: _Job) -> PartResult:
    rng = job.rng("grounding")
    result = PartResult("grounding")

    def samples():
        for index in range(job.sizes.grounding):
            scene = ordinary_scene(rng, job.spec, text_rate=0.3)
            annotation = tasks.grounding_annotation(scene)
            result.texts += [annotation["caption"], *(o["phrase"] for o in annotation["objects"])]
            yield {"__key__": f"{index:07d}", "png": encode_png(render_scene(scene)), "json": json.dumps(annotation)}

    result.files["grounding"] = write_shards(job.root, "pretrain/grounding/train", samples(), job.sizes.shard_size)
    result.counts["train"] = Counter(pretrain_grounding=job.sizes.grounding)
    result.num_images = job.sizes.grounding
    return result


# How often each question is drawn for a training conversation (OCR only applies to scenes with text,
# and small text is the hardest thing to learn, so it is drawn more).
TRAIN_QUESTION_WEIGHTS = {
    "colour": 1.0,
    "shape": 1.0,
    "position": 1.0,
    "count": 1.2,
    "existence": 1.0,
    "ocr": 3.0,
    # With a fifth of SFT batches on captions, acc@0.5 was 36 % at 1.2; at 2.0, 53-57 % in four runs and
    # 46 % in a fifth from another pre-trained model.
    "grounding": 2.0,
    "caption": 0.4,
}


def part_sft_single(job: _Job) -> PartResult:
    """Training conversations: one image, `min_turns` to `max_turns` different questions about it."""
    rng = job.rng("sft/single")
    result = PartResult("sft/single")
    images = ImageFolder(job.root, "train", "single")
    records, counts = [], Counter()
    names, weights = list(TRAIN_QUESTION_WEIGHTS), list(TRAIN_QUESTION_WEIGHTS.values())
    existence = Counter(yes=0, no=0)
    while len(records) < job.sizes.sft_single:
        scene = ordinary_scene(rng, job.spec, job.sizes.text_rate, job.sizes.hazard_rate)
        chosen = []
        wanted = rng.randint(job.sizes.min_turns, job.sizes.max_turns)
        for _ in range(3 * wanted):  # a drawn question may not apply, or repeat an earlier one
            if len(chosen) == wanted:
                break
            name = rng.choices(names, weights)[0]
            qa = tasks.SINGLE_IMAGE_QUESTIONS[name](scene, rng, banned=job.held_out)
            if qa is None or any(qa.question == other.question for other in chosen):
                continue
            if qa.task == "existence":
                # "yes" questions repeat within a conversation more often (a scene holds few objects), so
                # left alone the answers lean to "no" (57 %) and an unsure model learns to say "no" always.
                if existence[qa.answer] > existence["yes" if qa.answer == "no" else "no"]:
                    continue
                existence[qa.answer] += 1
            chosen.append(qa)
        if not chosen:
            continue
        index = len(records)
        path = images.save(scene, f"{index:06d}")
        turns = [(f"<image>\n{qa.question}" if k == 0 else qa.question, qa) for k, qa in enumerate(chosen)]
        records.append(conversation_record(f"single-train-{index:06d}", path, turns, "train", job.held_out))
        counts.update(asked.task for asked in chosen)
        result.texts += _qa_texts(turns)
    write_json_list(job.root / "sft/single.json", records)
    result.files["sft_single"] = ["sft/single.json"]
    result.counts["train"] = counts
    result.num_images = images.count
    return result


def _multi_image_num(rng: random.Random) -> int:
    return rng.choices((2, 3, 4), (0.5, 0.3, 0.2))[0]


def part_sft_multi(job: _Job) -> PartResult:
    """Training conversations over 2–4 images: the question the images were drawn for, then (up to
    `multi_turns` in all) other multi-image questions the same images allow, each of a different task."""
    rng = job.rng("sft/multi")
    result = PartResult("sft/multi")
    images = ImageFolder(job.root, "train", "multi")
    records, counts = [], Counter()
    for index in range(job.sizes.sft_multi):
        task = rng.choice(tasks.MULTI_IMAGE_TASKS)
        scenes, qa = tasks.MULTI_IMAGE_QUESTIONS[task](rng, job.spec, _multi_image_num(rng), banned=job.held_out)
        asks = rng.sample(tasks.MULTI_IMAGE_FOLLOW_UPS, len(tasks.MULTI_IMAGE_FOLLOW_UPS))
        follow_ups = [ask(scenes, rng, banned=job.held_out) for ask in asks]  # None where the images allow none
        chosen = [qa, *(other for other in follow_ups if other and other.task != qa.task)][: job.sizes.multi_turns]
        paths = [images.save(scene, f"{index:06d}-{k}") for k, scene in enumerate(scenes)]
        turns = [(tasks.image_prompt(len(scenes), qa.question), qa)]
        turns += [(follow_up.question, follow_up) for follow_up in chosen[1:]]
        records.append(conversation_record(f"multi-train-{index:06d}", paths, turns, "train", job.held_out))
        counts.update(asked.task for asked in chosen)
        result.texts += _qa_texts(turns)
    write_json_list(job.root / "sft/multi.json", records)
    result.files["sft_multi"] = ["sft/multi.json"]
    result.counts["train"] = counts
    result.num_images = images.count
    return result


def _safety_records(
    job: _Job, rng: random.Random, split: str, count: int, kind_weights: dict, images: ImageFolder, result: PartResult
) -> tuple[list[dict], Counter]:
    """`count` safety records of kinds drawn by `kind_weights`; their text goes to `result.texts`."""
    records, counts = [], Counter()
    kinds = list(kind_weights)
    for index in range(count):
        kind = rng.choices(kinds, [kind_weights[k] for k in kinds])[0]
        banned = job.held_out if split != "test" else frozenset()
        scene, qa, safe = tasks.safety_sample(rng, job.spec, kind, banned=banned)
        path = images.save(scene, f"{index:06d}")
        turns = [(f"<image>\n{qa.question}", qa)]
        record = conversation_record(f"safety-{split}-{index:06d}", path, turns, split, job.held_out)
        record |= {"safe": safe, "safety_kind": kind}
        records.append(record)
        counts[f"safety_{kind}"] += 1
        result.texts += _qa_texts(turns)
    return records, counts


def part_sft_safety(job: _Job) -> PartResult:
    rng = job.rng("sft/safety")
    result = PartResult("sft/safety")
    images = ImageFolder(job.root, "train", "safety")
    weights = {"harmful": 0.4, "ordinary": 0.2, "benign_trigger": 0.2, "hazard_ordinary": 0.2}
    records, counts = _safety_records(job, rng, "train", job.sizes.sft_safety, weights, images, result)
    write_json_list(job.root / "sft/safety.json", records)
    result.files["sft_safety"] = ["sft/safety.json"]
    result.counts["train"] = counts
    result.num_images = images.count
    return result


def part_preference(job: _Job, split: str) -> PartResult:
    """A caption pair per image, then a yes/no existence pair on the same image (`tasks`): 2 × `count` rows."""
    rng = job.rng(f"preference/{split}")
    existence_rng = job.rng(f"preference/{split}/existence")  # the caption pairs do not depend on these
    result = PartResult(f"preference/{split}")
    images = ImageFolder(job.root, split, "preference")
    count = job.sizes.preference if split == "train" else job.sizes.preference_validation
    records, counts = [], Counter()
    for index in range(count):
        # Captions name every object, so held-out pairs stay out of the scene entirely.
        scene = sample_scene(rng, job.spec, forbidden=job.held_out)
        caption_pair = tasks.preference_pair(scene, rng, banned=job.held_out)
        existence_pair = tasks.existence_preference_pair(scene, existence_rng, banned=job.held_out)
        path = images.save(scene, f"{index:06d}")
        for suffix, pair in (("", caption_pair), ("-existence", existence_pair)):
            records.append(
                {
                    "id": f"preference-{split}-{index:06d}{suffix}",
                    "images": [path],
                    "prompt": f"<image>\n{pair.question}",
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "task": pair.task,
                    "objects_present": pair.objects_present,
                    "hallucinated": pair.hallucinated,
                    "split": split,
                }
            )
            counts[pair.task] += 1
        # The tokenizer's text: the caption pairs. The existence pairs' question and answers are those of the
        # SFT conversations, already in it; adding them would change its counts, so its merges and every model.
        result.texts += [caption_pair.question, caption_pair.chosen, caption_pair.rejected]
    write_jsonl(job.root / f"preference/{split}.jsonl", records)
    result.files[f"preference/{split}"] = [f"preference/{split}.jsonl"]
    result.counts[split] = counts
    result.num_images = images.count
    return result


# Tasks whose question can be about a held-out pair (the test split asks about one half the time).
_FOCUSABLE = {"colour", "shape", "position", "existence", "grounding", "multi_which", "multi_colour"}
HELD_OUT_TEST_RATE = 0.5


def part_eval(job: _Job, split: str) -> PartResult:
    """One-question records for evaluation: single- and multi-image tasks, POPE, safety."""
    rng = job.rng(f"eval/{split}")
    result = PartResult(f"eval/{split}")
    held_out = sorted(job.held_out)
    banned = frozenset() if split == "test" else job.held_out
    per_task = job.sizes.test_per_task if split == "test" else job.sizes.validation_per_task
    counts = Counter()

    def wants_held_out(task: str) -> list:
        if split == "test" and task in _FOCUSABLE and rng.random() < HELD_OUT_TEST_RATE:
            return [rng.choice(held_out)]
        return []

    folders = {group: ImageFolder(job.root, split, group) for group in ("single", "multi", "pope", "safety")}
    single = []
    for task in tasks.SINGLE_IMAGE_TASKS:
        for _ in range(per_task):
            for _attempt in range(100):  # e.g. a string that found no room: draw another scene
                focus = wants_held_out(task)
                scene = _eval_scene(job, rng, task, focus)
                ask = tasks.SINGLE_IMAGE_QUESTIONS["ocr" if task.startswith("ocr") else task]
                qa = ask(scene, rng, banned=banned, focus=focus)
                if qa is not None and qa.task == task:
                    break
            else:
                raise RuntimeError(f"no scene of this world can be asked a {task!r} question; check the WorldSpec")
            path = folders["single"].save(scene, f"{len(single):06d}")
            turns = [(f"<image>\n{qa.question}", qa)]
            record = conversation_record(f"single-{split}-{len(single):06d}", path, turns, split, job.held_out)
            if task == "caption":  # what the image holds, to score the objects a caption names (CHAIR)
                record["objects"] = [shape.phrase for shape in tasks.reading_order(scene)]
            single.append(record | scene_facets(scene))
            counts[task] += 1
    write_json_list(job.root / f"eval/{split}/single.json", single)

    multi = []
    for task in tasks.MULTI_IMAGE_TASKS:
        for _ in range(per_task):
            index = len(multi)
            scenes, qa = tasks.MULTI_IMAGE_QUESTIONS[task](
                rng, job.spec, _multi_image_num(rng), banned=banned, focus=wants_held_out(task)
            )
            paths = [folders["multi"].save(scene, f"{index:06d}-{k}") for k, scene in enumerate(scenes)]
            turns = [(tasks.image_prompt(len(scenes), qa.question), qa)]
            multi.append(conversation_record(f"multi-{split}-{index:06d}", paths, turns, split, job.held_out))
            counts[task] += 1
    write_json_list(job.root / f"eval/{split}/multi.json", multi)

    pope, pope_files = [], []
    per_category = job.sizes.pope_test_per_category if split == "test" else job.sizes.pope_validation_per_category
    for category in tasks.POPE_CATEGORIES:
        official = []  # POPE's own format: {"question_id", "image", "text", "label"}
        for _ in range(per_category):
            scene = sample_scene(rng, job.spec)
            path = folders["pope"].save(scene, f"{folders['pope'].count:06d}")
            for qa in tasks.pope_questions(scene, rng, category):
                record = conversation_record(
                    f"pope-{split}-{len(pope):06d}", path, [(f"<image>\n{qa.question}", qa)], split, job.held_out
                )
                pope.append(record | {"category": category} | scene_facets(scene))
                official.append(
                    {"question_id": len(official) + 1, "image": path, "text": qa.question, "label": qa.answer}
                )
        counts[f"pope_{category}"] += len(official)
        write_jsonl(job.root / f"eval/{split}/pope_{category}.jsonl", official)
        pope_files.append(f"eval/{split}/pope_{category}.jsonl")
    write_json_list(job.root / f"eval/{split}/pope.json", pope)

    safety_count = job.sizes.safety_test if split == "test" else job.sizes.safety_validation
    weights = {"harmful": 0.5, "ordinary": 1 / 6, "benign_trigger": 1 / 6, "hazard_ordinary": 1 / 6}
    safety, safety_counts = _safety_records(job, rng, split, safety_count, weights, folders["safety"], result)
    counts.update(safety_counts)
    write_json_list(job.root / f"eval/{split}/safety.json", safety)

    result.files[f"eval/{split}"] = {
        "single": [f"eval/{split}/single.json"],
        "multi": [f"eval/{split}/multi.json"],
        "pope": [f"eval/{split}/pope.json"],
        "pope_official": pope_files,
        "safety": [f"eval/{split}/safety.json"],
    }
    result.counts[split] = counts
    result.num_images = sum(folder.count for folder in folders.values())
    result.texts += [m["value"].replace("<image>", "") for r in single + multi for m in r["conversations"]]
    return result


def write_test_split(world_dir: str | Path, out_dir: str | Path, per_task: int) -> dict:
    """A test split drawn as `world_dir`'s own (its seed, spec and held-out pairs) with `per_task` questions
    per task, POPE and safety questions in proportion, into `out_dir`; returns its manifest (also written).

    For comparisons finer than the world's test split allows: on the demo's 60 questions per task an
    accuracy near 50 % is known to about ±12 points, on 1,500 to ±2.5, and a paired change between two
    models to about ±2 (docs/demo-findings.md). The same seeded generator draws it, so it begins with the
    world's own test questions: a larger sample of the same distribution, of images no training part holds.
    `out_dir` must not hold a test split already (nothing written is replaced).
    """
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    manifest_file = world_dir / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{world_dir} is not a world written by `blip3 world`: it has no manifest.json")
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1, got {per_task}")
    if (out_dir / "eval" / "test").exists() or (out_dir / "images" / "test").exists():
        raise FileExistsError(f"{out_dir} holds a test split already; write the new one into another folder")
    world = json.loads(manifest_file.read_text())
    sizes = WorldSizes(**world["sizes"])
    scale = per_task / sizes.test_per_task
    sizes = replace(
        sizes,
        test_per_task=per_task,
        pope_test_per_category=max(1, round(sizes.pope_test_per_category * scale)),
        safety_test=max(1, round(sizes.safety_test * scale)),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    result = part_eval(_Job(out_dir, WorldSpec.from_dict(world["spec"]), sizes, world["seed"]), "test")
    manifest = {
        "test_split_of": str(world_dir.resolve()),
        "seed": world["seed"],
        "spec": world["spec"],
        "sizes": asdict(sizes),
        "held_out_pairs": world["held_out_pairs"],
        "image_root": "images",
        "num_images": result.num_images,
        "counts": {"test": dict(sorted(result.counts["test"].items()))},
        "files": result.files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def scene_facets(scene: Scene) -> dict:
    """The breakdowns evaluation reports an image's questions by: how many shapes it holds (a question
    about one of four needs the model to find its object among them; docs/demo-findings.md)."""
    return {"facets": {"shapes": len(scene.objects)}}


def _eval_scene(job: _Job, rng: random.Random, task: str, focus: list) -> Scene:
    """A scene fit for `task`: text of the right size for OCR, the focus pair where one is asked about."""
    if task == "ocr_small":
        return sample_scene(rng, job.spec, text="small")
    if task == "ocr_large":
        return sample_scene(rng, job.spec, text="large")
    text = "mixed" if rng.random() < 0.3 else None
    if not focus:
        return sample_scene(rng, job.spec, text=text)
    if task == "existence" and rng.random() < 0.5:  # a held-out pair that is not there: answer "no"
        return sample_scene(rng, job.spec, text=text, forbidden=focus)
    return sample_scene(rng, job.spec, text=text, required=focus)


# Largest first, so that parallel workers finish together.
PARTS: dict[str, Callable[[_Job], PartResult]] = {
    "sft/multi": part_sft_multi,
    "captions/train": lambda job: part_captions(job, "train"),
    "tags": part_tags,
    "eval/test": lambda job: part_eval(job, "test"),
    "sft/single": part_sft_single,
    "ocr": part_ocr,
    "grounding": part_grounding,
    "interleaved": part_interleaved,
    "eval/validation": lambda job: part_eval(job, "validation"),
    "preference/train": lambda job: part_preference(job, "train"),
    "sft/safety": part_sft_safety,
    "captions/validation": lambda job: part_captions(job, "validation"),
    "preference/validation": lambda job: part_preference(job, "validation"),
}


def _run_part(name: str, job: _Job) -> PartResult:
    return PARTS[name](job)


# ---------------------------------------------------------------------------------------------------
# Mixtures and manifest


def _source(name, source_type, data_format, paths, weight, image_root=None) -> dict:
    """One source entry of a mixture: {name, type, format, path, weight, image_root?}.

    Several shards are named in webdataset's brace notation, `dir/train-{000000..000003}.tar`.
    """
    if len(paths) > 1:
        stem, first = paths[0].removesuffix(".tar").rsplit("-", 1)
        last = paths[-1].removesuffix(".tar").rsplit("-", 1)[1]
        path = f"{stem}-{{{first}..{last}}}.tar"
    else:
        path = paths[0]
    entry = {"name": name, "type": source_type, "format": data_format, "path": path, "weight": weight}
    if image_root is not None:
        entry["image_root"] = image_root
    return entry


def _mixtures(files: dict) -> dict[str, dict]:
    """One mixture per training stage, in the data readers' source schema (sample counts: the manifest)."""

    def shards(name, data_format, kind, weight):
        return _source(name, "webdataset", data_format, files[kind], weight)

    def llava(name, paths, weight):
        return _source(name, "llava", "conversation", paths, weight, image_root="images")

    def preference(paths):
        return _source("preference", "jsonl", "preference", paths, 1.0, image_root="images")

    single = llava("sft_single", files["sft_single"], 1.0)
    captions = shards("captions", "caption", "captions/train", 1.0)
    validation_single = llava("validation_single", files["eval/validation"]["single"], 1.0)
    validation_multi = llava("validation_multi", files["eval/validation"]["multi"], 1.0)
    mixtures = {
        "stage0": {
            "stage": "stage0",
            "sources": [captions],
            "validation": [shards("captions", "caption", "captions/validation", 1.0)],
        },
        "pretrain": {
            "stage": "pretrain",
            "sources": [
                captions | {"weight": 0.4},
                shards("interleaved", "interleaved", "interleaved", 0.15),
                shards("ocr", "ocr", "ocr", 0.25),
                shards("grounding", "grounding", "grounding", 0.2),
            ],
        },
        "sft": {
            "stage": "sft",
            # Pre-training captions replayed during SFT. Training questions never name a held-out pair, so
            # on questions alone the LM learns that a green shape is never a triangle and answers the test's
            # held-out pairs from that prior ("What shape is the green one?" -> "star"), although it names
            # their shapes in captions. The captions show those pairs. Held-out-pair shape questions right
            # after SFT (100 test questions): 13 % on questions alone; with captions in 15-25 % of the
            # batches, 32-53 % in four runs from one pre-trained model but 16-21 % in four from another
            # (docs/demo-findings.md: "SFT taught the model ...").
            "sources": [single | {"weight": 0.8}, captions | {"weight": 0.2}],
            "validation": [validation_single],
        },
        "multi_image_sft": {
            "stage": "multi_image_sft",
            "sources": [
                llava("sft_multi", files["sft_multi"], 0.6),
                single | {"weight": 0.3},
                captions | {"weight": 0.1},
            ],
            "validation": [validation_multi, validation_single],
        },
        "dpo": {
            "stage": "dpo",
            "sources": [preference(files["preference/train"])],
            "validation": [preference(files["preference/validation"])],
        },
        "safety": {
            "stage": "safety",
            # SFT data of both kinds keeps ordinary answering from eroding while refusals are learned: with
            # single-image conversations alone, the multi-image tasks fell from ~45 % to ~0 in this stage.
            "sources": [
                llava("sft_safety", files["sft_safety"], 0.5),
                single | {"weight": 0.25},
                llava("sft_multi", files["sft_multi"], 0.25),
            ],
        },
    }
    if files.get("tags"):  # the second pre-training stage of `blip3 demo --tags`
        mixtures["tags"] = {"stage": "tags", "sources": [shards("tags", "caption", "tags", 1.0)]}
        # and half of SFT's replay, as lists that also name an absent pair. The lookup by shape the tags stage
        # teaches survived SFT reliably only where SFT kept using it: without a replay in one run of two, with
        # the plain lists in three of three, but those SFT models said "yes" to half of POPE's absent objects
        # or more. From the same tags model, replaying the lists with an absent pair kept the lookup (196 of
        # 200 colour questions by shape) and took the POPE hallucination rate from 51 to 13 % (default SFT:
        # 33 %; the whole demo with it: 9 %); a tags stage on such lists lost the lookup (docs/demo-findings.md).
        absent = shards("tags_absent", "caption", "tags_absent", 0.1)
        mixtures["sft"]["sources"] = [single | {"weight": 0.8}, captions | {"weight": 0.1}, absent]
    return mixtures


# ---------------------------------------------------------------------------------------------------
# The entry point


def build_world(
    out_dir: str | Path,
    sizes: WorldSizes | None = None,
    spec: WorldSpec | None = None,
    seed: int = 0,
    workers: int = 2,
    tokenizer_vocab_size: int = 640,
    progress: bool = True,
) -> dict:
    """Write the whole world into `out_dir` and return its manifest (also written as manifest.json).

    Deterministic for (seed, sizes, spec): every file's bytes are. `workers` > 1 writes the parts in
    that many forked processes (each part has its own seeded RNG, so the output does not change; the
    parts use PIL and files only, nothing a fork could break).
    """
    from blip3.synthetic.tokenizer import build_world_tokenizer  # after the data: it trains on its text

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    job = _Job(root, spec or WorldSpec(), sizes or WorldSizes.demo(), seed)

    names = list(PARTS)
    if workers > 1:
        context = multiprocessing.get_context("fork")  # the parts need no fresh interpreter, only a seed
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            done = pool.map(_run_part, names, [job] * len(names))
            results = list(tqdm(done, total=len(names), desc="world", unit="part", disable=not progress))
    else:
        results = [_run_part(name, job) for name in tqdm(names, desc="world", unit="part", disable=not progress)]

    files = dict(sorted((key, paths) for result in results for key, paths in result.files.items()))
    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for result in results:
        for split, counter in result.counts.items():
            counts[split].update(counter)

    # The system prompt opens every conversation the model reads (training and evaluation alike), so it
    # counts once per conversation: the tokenizer then spells it in a few dozen pieces, not ~90 bytes.
    sizes = job.sizes
    conversations = sizes.sft_single + sizes.sft_multi + sizes.sft_safety + sizes.preference
    texts = [XGENMM_SYSTEM_PROMPT] * max(1, conversations) + [text for result in results for text in result.texts]
    tokenizer = build_world_tokenizer(texts, vocab_size=tokenizer_vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")

    manifest = {
        "seed": seed,
        "spec": asdict(job.spec),
        "sizes": asdict(job.sizes),
        "held_out_pairs": [list(pair) for pair in job.spec.held_out_pairs],
        "image_root": "images",
        "tokenizer": "tokenizer",
        "num_images": sum(result.num_images for result in results),
        "counts": {split: dict(sorted(counter.items())) for split, counter in counts.items()},
        "files": files,
        "mixtures": {},
    }
    for stage, mixture in _mixtures(files).items():
        path = f"{stage}.yaml"
        header = (
            f"# blip3 synthetic world (seed {seed}): the {stage} mixture. Paths are relative to this file.\n"
            "# `validation` lists held-out sources in the same schema (for validation loss), if any.\n"
        )
        (root / path).write_text(header + yaml.safe_dump(mixture, sort_keys=False))
        manifest["mixtures"][stage] = path
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
