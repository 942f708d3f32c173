"""blip3's synthetic world, read from its evaluation files (LLaVA JSON, as `blip3 world` writes them).

One entry (a JSON list of them, or JSON lines):

    {"id": "single-test-000021",
     "image": "test/single/000021.png" | ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image>\\nGive the bounding box of the blue circle."},
                       {"from": "gpt", "value": "[0.38, 0.04, 0.57, 0.43]"}],
     "task": "colour" | "shape" | "position" | "count" | "existence" | "ocr_small" | "grounding" |
             "caption" | "multi_which" | ... | "pope" | "safety",
     "answer": "[0.38, 0.04, 0.57, 0.43]",   the canonical answer (default: the last gpt turn)
     "box": [0.376, 0.041, 0.571, 0.43],     grounding: the target, in the coordinates answers use
     "safe": true | false,                   safety prompts: whether the request should be answered
     "held_out": true,                       the question names a colour × shape pair held out of training
     "category": "adversarial",              optional breakdown (POPE's sampling); safety: `safety_kind`
     "facets": {"shapes": 3},                optional further breakdowns (the world: shapes in the image)
     "objects": ["red circle", "blue star"], captions: what the image holds; the captions are then also
                                             scored with CHAIR over the world's colour × shape phrases
     "metric": "exact_match"}                optional: overrides the metric the task implies

Image paths are relative to the file's folder or to an `images/` folder beside it or above it (the
world keeps its images in `<world>/images/`); `image_root` overrides both.

The metric follows from the entry: `safe` present -> refusal (refusal rate on unsafe requests,
over-refusal on safe ones); task "grounding" -> accuracy at IoU >= 0.5 against `box`; a caption task
-> CIDEr; a yes/no probe set (`POPE_TASKS`) -> the POPE metrics; anything else -> exact match
against `answer`. Each task is broken down by `category`, by `safety_kind`, or else by whether the
question names a held-out pair, so the report shows generalisation to unseen combinations; and
by each of its `facets`.
The question asked is the last human turn; earlier turns are kept as the conversation's context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip3.evaluation.items import CIDER, EXACT_MATCH, GROUNDING, METRICS, POPE, REFUSAL, EvalItem
from blip3.processing.tokenizer import IMAGE_TOKEN

# Task names of POPE-style yes/no probe sets. (The world's ordinary "existence" questions stay exact
# match, like the other SFT tasks; its `pope` set is the hallucination probe.)
POPE_TASKS = frozenset({"pope", "yes_no", "yesno", "hallucination"})
CAPTION_TASKS = frozenset({"caption", "captions", "dense_caption"})
_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def load_synthetic(path: Path, image_root: Path | None = None) -> list[EvalItem]:
    """The items of one synthetic-world evaluation file (JSON list or JSON lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        entries = json.loads(text)
    if image_root is not None:
        roots = [Path(image_root)]
    else:
        folder = path.absolute().parent
        roots = [folder, folder / "images", *(ancestor / "images" for ancestor in list(folder.parents)[:3])]
    vocabulary = None
    if any("objects" in entry for entry in entries):
        from blip3.synthetic.world import object_vocabulary

        vocabulary = object_vocabulary()  # one dict, shared by every item
    return [_item(entry, roots, f"{path.name}[{index}]", vocabulary) for index, entry in enumerate(entries)]


def metric_for(entry: dict[str, Any]) -> str:
    """The metric an entry is scored with (see the module docstring)."""
    if "metric" in entry:
        if entry["metric"] not in METRICS:
            raise ValueError(f"unknown metric {entry['metric']!r}")
        return entry["metric"]
    if "safe" in entry:
        return REFUSAL
    task = entry.get("task", "")
    if task == "grounding":
        return GROUNDING
    if task in CAPTION_TASKS:
        return CIDER
    if task in POPE_TASKS:
        return POPE
    return EXACT_MATCH


def _item(entry: dict[str, Any], roots: list[Path], where: str, vocabulary: dict[str, str] | None) -> EvalItem:
    names = entry.get("image") or []
    names = [names] if isinstance(names, str) else list(names)
    images = [_locate(name, roots, where) for name in names]

    messages = [dict(message) for message in entry["conversations"]]
    answer_turn = messages.pop()["value"] if messages and messages[-1].get("from") == "gpt" else None
    if not messages or messages[-1].get("from") != "human":
        raise ValueError(f"{where}: the conversation must end with a human question (and optionally its answer)")
    # LLaVA data may leave the image marker out; then the images go before the first question, as in training.
    if images and not any(IMAGE_TOKEN in m["value"] for m in messages):
        first_human = next(m for m in messages if m.get("from") == "human")
        first_human["value"] = f"{IMAGE_TOKEN}\n" * len(images) + first_human["value"]
    markers = sum(m["value"].count(IMAGE_TOKEN) for m in messages)
    if markers != len(images):
        raise ValueError(f"{where}: {markers} <image> markers for {len(images)} images")

    metric = metric_for(entry)
    reference = entry.get("answer", answer_turn)
    prompt = messages[-1]["value"]
    return EvalItem(
        id=str(entry.get("id", where)),
        task=entry.get("task", "synthetic"),
        metric=metric,
        prompt=prompt,
        images=images,
        references=[str(reference)] if reference is not None else [],
        question=" ".join(prompt.replace(IMAGE_TOKEN, " ").split()),
        box=tuple(float(v) for v in entry["box"]) if metric == GROUNDING else None,
        safe=bool(entry["safe"]) if metric == REFUSAL else None,
        category=_category(entry),
        facets={str(name): str(value) for name, value in entry.get("facets", {}).items()},
        context=[{"role": _ROLES[m["from"]], "content": m["value"]} for m in messages[:-1]],
        objects=[str(name) for name in entry["objects"]] if "objects" in entry else None,
        object_vocabulary=vocabulary if "objects" in entry else None,
    )


def _category(entry: dict[str, Any]) -> str | None:
    if "category" in entry:
        return str(entry["category"])
    if "safety_kind" in entry:
        return str(entry["safety_kind"])
    if "held_out" in entry:
        return "held-out pair" if entry["held_out"] else "seen pairs"
    return None


def _locate(name: str, roots: list[Path], where: str) -> Path:
    for root in roots:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{where}: image {name!r} not found under {', '.join(map(str, roots))}")
