"""Runner: a model answers a benchmark's items in batches, and the answers are scored per task.

    results = evaluate(model, processor, items, batch_size=8)                         # instruct model
    results = evaluate(model, processor, items, mode="base", shots=4, support=train)  # base model, 4-shot
    results.save("runs/eval/results.json")

Decoding is greedy, prompts are left-padded by the processor, and generation stops at the end of
the turn (instruct) or of the example (`<|endofchunk|>`, base). Scores do not depend on the batch
size or on the order of the items: batched greedy generation gives the tokens one-by-one generation
gives (a property of the model, tested), and each item's prompt depends on the item alone (its
few-shot examples are drawn by a generator seeded with its id). Items are sorted by length into
batches, so batches waste little padding; answers come back in the items' order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from blip3.evaluation import prompts
from blip3.evaluation.items import (
    ANLS,
    CIDER,
    EXACT_MATCH,
    GROUNDING,
    MULTIPLE_CHOICE,
    POPE,
    REFUSAL,
    VQA_ACCURACY,
    EvalItem,
)
from blip3.evaluation.scoring import score_task
from blip3.processing.image import ImageSource
from blip3.processing.processor import Blip3Processor
from blip3.processing.tokenizer import END_OF_CHUNK_TOKEN, special_token_ids

Mode = Literal["instruct", "base"]

# Enough for each kind of answer, short enough that a rambling model costs little.
DEFAULT_MAX_NEW_TOKENS = {
    VQA_ACCURACY: 16,
    CIDER: 40,
    ANLS: 32,
    EXACT_MATCH: 32,
    MULTIPLE_CHOICE: 8,
    POPE: 8,
    GROUNDING: 48,
    REFUSAL: 48,
}


@dataclass
class ItemResult:
    id: str
    task: str
    metric: str
    prompt: str  # the question as the item states it (instruct form, `<image>` markers included)
    prediction: str
    references: list[str]
    score: float  # the item's share of its task's primary number (see scoring.py), in [0, 1] (CIDEr: its own scale)
    details: dict[str, Any] = field(default_factory=dict)  # what the metric read from the answer, the target


@dataclass
class EvalResults:
    """One model's answers to one benchmark and their scores; `save`/`load` as JSON."""

    label: str  # what the report calls this model (a stage: "pretrain", "sft", ...)
    benchmark: str
    settings: dict[str, Any]
    tasks: dict[str, dict[str, Any]]  # task -> summary (scoring.score_task)
    items: list[ItemResult]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResults:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{**data, "items": [ItemResult(**item) for item in data["items"]]})


@dataclass
class _Request:
    """What the model is asked for one item."""

    conversation: list[dict] | None  # instruct mode
    text: str | None  # base mode: the raw few-shot prompt
    images: list[ImageSource]
    max_new_tokens: int


def evaluate(
    model: torch.nn.Module,
    processor: Blip3Processor,
    items: Sequence[EvalItem],
    *,
    batch_size: int = 8,
    mode: Mode = "instruct",
    shots: int = 0,
    support: Sequence[EvalItem] | None = None,
    zero_shot_text_examples: int = prompts.ZERO_SHOT_TEXT_EXAMPLES,
    max_new_tokens: int | None = None,
    seed: int = 0,
    label: str = "model",
    benchmark: str = "",
    progress: bool = True,
) -> EvalResults:
    """Answer every item with greedy decoding and score the answers, task by task.

    model: a Blip3ForConditionalGeneration (anything with its `generate`).
    mode: "instruct" (the chat template, one user turn per item) or "base" (raw OpenFlamingo-style
        few-shot prompts, see prompts.py).
    shots: base mode: examples per prompt, drawn from `support` (default: the evaluated items
        themselves; an item is never its own example). Zero-shot prompts hold
        `zero_shot_text_examples` examples without their images, as OpenFlamingo's.
    max_new_tokens: for every item (default: per metric, `DEFAULT_MAX_NEW_TOKENS`).
    """
    if mode not in ("instruct", "base"):
        raise ValueError(f"mode must be 'instruct' or 'base', got {mode!r}")
    if mode == "instruct" and shots:
        raise ValueError("few-shot prompts are for base models: use mode='base'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not items:
        raise ValueError("no items to evaluate")
    support = items if support is None else support
    requests = [_request(item, mode, shots, support, zero_shot_text_examples, max_new_tokens, seed) for item in items]
    start = time.perf_counter()
    raw_answers = _generate_all(model, processor, requests, mode, batch_size, progress, desc=benchmark or label)
    seconds = time.perf_counter() - start
    predictions = [
        prompts.clean_base_answer(answer, item) if mode == "base" else answer.strip()
        for answer, item in zip(raw_answers, items)
    ]

    task_names = list(dict.fromkeys(item.task for item in items))
    summaries, item_results = {}, [None] * len(items)
    for task in task_names:
        positions = [i for i, item in enumerate(items) if item.task == task]
        per_item, summaries[task] = score_task([items[i] for i in positions], [predictions[i] for i in positions])
        for i, scored in zip(positions, per_item):
            item_results[i] = _item_result(items[i], predictions[i], scored)
    settings = {
        "mode": mode,
        "shots": shots if mode == "base" else None,
        "zero_shot_text_examples": zero_shot_text_examples if mode == "base" and shots == 0 else None,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else "per metric",
        "seed": seed,
        "num_items": len(items),
        "seconds": round(seconds, 2),  # the one field that differs between identical runs
    }
    return EvalResults(label=label, benchmark=benchmark, settings=settings, tasks=summaries, items=item_results)


def _request(item, mode, shots, support, zero_shot_text_examples, max_new_tokens, seed) -> _Request:
    budget = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[item.metric]
    if mode == "instruct":
        return _Request(item.conversation, None, list(item.images), budget)
    if shots > 0:
        examples = prompts.select_shots(item, support, shots, seed)
        text, images = prompts.base_prompt(item, examples)
    else:
        examples = prompts.select_shots(item, support, zero_shot_text_examples, seed)
        text, images = prompts.base_prompt(item, examples, text_only_shots=True)
    return _Request(None, text, images, budget)


def _generate_all(model, processor, requests, mode, batch_size, progress, desc) -> list[str]:
    """The greedy answer to every request, in the requests' order, decoded up to its first stop token."""
    ids = special_token_ids(processor.tokenizer)
    stop_ids = {ids["end"], ids["eos"]}
    if mode == "base":
        stop_ids.add(processor.tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN))
    stop_ids = sorted(i for i in stop_ids if i is not None)

    answers: list[str] = [""] * len(requests)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(requests), desc=f"eval {desc}", unit="item", disable=not progress) as bar,
        ):
            for batch in _batches(requests, batch_size):
                chosen = [requests[i] for i in batch]
                images = [request.images for request in chosen]
                if mode == "instruct":
                    inputs = processor.process_conversations(
                        [request.conversation for request in chosen], images, add_generation_prompt=True
                    )
                else:
                    inputs = processor([request.text for request in chosen], images, padding_side="left")
                new_tokens = model.generate(
                    **inputs.to(device),
                    max_new_tokens=chosen[0].max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=stop_ids,
                    pad_token_id=processor.pad_token_id,
                )
                for i, row in zip(batch, new_tokens.tolist()):
                    end = next((position for position, token in enumerate(row) if token in stop_ids), len(row))
                    answers[i] = processor.tokenizer.decode(row[:end], skip_special_tokens=True)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return answers


def _batches(requests: Sequence[_Request], batch_size: int) -> list[list[int]]:
    """Request indices in batches of one token budget each, similar prompts together (little padding)."""

    def size(i: int) -> tuple[int, int, int]:
        request = requests[i]
        text = request.text if request.text is not None else "".join(str(m) for m in request.conversation)
        return (-request.max_new_tokens, len(request.images), len(text))

    batches: list[list[int]] = []
    for i in sorted(range(len(requests)), key=size):
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or requests[last[0]].max_new_tokens != requests[i].max_new_tokens:
            batches.append([])
        batches[-1].append(i)
    return batches


def _item_result(item: EvalItem, prediction: str, scored: dict[str, Any]) -> ItemResult:
    details = {key: value for key, value in scored.items() if key != "score"}
    if item.box is not None:
        details["target_box"] = list(item.box)
    if item.safe is not None:
        details["safe"] = item.safe
    if item.choices is not None:
        details["choices"] = list(item.choices)
    if item.category is not None:
        details["category"] = item.category
    if item.facets:
        details["facets"] = dict(item.facets)
    return ItemResult(
        id=item.id,
        task=item.task,
        metric=item.metric,
        prompt=item.prompt,
        prediction=prediction,
        references=list(item.references),
        score=float(scored["score"]),
        details=details,
    )
