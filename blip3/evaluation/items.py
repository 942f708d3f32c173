"""`EvalItem`: one question of one benchmark, in the single shape every adapter produces.

Adapters (`adapters.py`, `synthetic.py`) read a benchmark's own files and yield these; the runner
prompts the model with `conversation` (instruct models) or `question` (base models, few-shot), and
`scoring.py` scores the answer against `references` with the item's `metric`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blip3.processing.image import ImageSource

# The metric kinds, each defined in `scoring.py` (and its maths in `metrics.py`).
VQA_ACCURACY = "vqa_accuracy"  # VQAv2 / OK-VQA / TextVQA / VizWiz: min(#humans agreeing / 3, 1)
CIDER = "cider"  # captions: CIDEr-D over the task's items
ANLS = "anls"  # text answers scored by edit distance
EXACT_MATCH = "exact_match"  # normalised string equality
MULTIPLE_CHOICE = "multiple_choice"  # the option letter extracted from the answer
POPE = "pope"  # yes/no object existence: accuracy, precision, recall, F1, yes-ratio
GROUNDING = "grounding"  # a box parsed from the answer, hit at IoU >= 0.5
REFUSAL = "refusal"  # whether the model declines: refusal rate (unsafe) and over-refusal rate (safe)
METRICS = (VQA_ACCURACY, CIDER, ANLS, EXACT_MATCH, MULTIPLE_CHOICE, POPE, GROUNDING, REFUSAL)

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class EvalItem:
    """One evaluation question.

    id: unique within its benchmark (it also seeds the choice of few-shot examples).
    task: the name it is reported under (a benchmark, one of its splits, or a synthetic task).
    prompt: the instruct-model user turn, with one `<image>` where each image goes.
    images: in `<image>` order (paths, PIL images or encoded bytes).
    references: what the answer is scored against: VQA's human answers, reference captions, the
        correct option letter, "yes"/"no", the expected answer text.
    question: the bare question for base-model prompts (`Question: ... Short answer:`); None for
        captioning, whose base prompt is a caption prefix.
    choices: multiple choice only: the option texts, in letter order.
    box: grounding only: the target box (x1, y1, x2, y2) in the coordinates answers use.
    safe: refusal only: whether answering is the right behaviour.
    category: a finer breakdown reported inside the task (answer type, question type, domain, ...).
    facets: further breakdowns, each its own table inside the task: {facet: value}, e.g. the synthetic
        world's {"shapes": "3"} (how many shapes the image holds).
    group: rows that form one question under circular evaluation (MMBench's rotated options).
    context: earlier turns of a multi-turn conversation (chat or LLaVA messages), before `prompt`.
    objects: captioning only: the names of the objects the image holds; with `object_vocabulary`, the
        captions are also scored for the objects they name that are not there (CHAIR).
    object_vocabulary: captioning only: {phrase as a caption writes it: object name}, every object a
        caption might name (plurals and synonyms included); items of one set share one.
    """

    id: str
    task: str
    metric: str
    prompt: str
    images: list[ImageSource] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    question: str | None = None
    choices: list[str] | None = None
    box: tuple[float, float, float, float] | None = None
    safe: bool | None = None
    category: str | None = None
    facets: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    context: list[dict[str, Any]] = field(default_factory=list)
    objects: list[str] | None = None
    object_vocabulary: Mapping[str, str] | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"item {self.id!r}: unknown metric {self.metric!r} (known: {', '.join(METRICS)})")
        if self.metric == MULTIPLE_CHOICE and not self.choices:
            raise ValueError(f"item {self.id!r}: a multiple-choice item needs its choices")
        if self.metric == GROUNDING and self.box is None:
            raise ValueError(f"item {self.id!r}: a grounding item needs its target box")
        if self.metric == REFUSAL and self.safe is None:
            raise ValueError(f"item {self.id!r}: a refusal item needs `safe` (true or false)")
        if self.metric not in (GROUNDING, REFUSAL) and not self.references:
            raise ValueError(f"item {self.id!r}: no references to score against")
        if (self.objects is None) != (self.object_vocabulary is None):
            raise ValueError(f"item {self.id!r}: CHAIR needs both the image's objects and an object vocabulary")
        if self.objects is not None and self.metric != CIDER:
            raise ValueError(f"item {self.id!r}: objects are for scoring captions (CHAIR), not {self.metric}")
        if self.objects is not None and not set(self.objects) <= set(self.object_vocabulary.values()):
            unknown = sorted(set(self.objects) - set(self.object_vocabulary.values()))
            raise ValueError(f"item {self.id!r}: objects {unknown} are not named by the object vocabulary")

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """The messages an instruct model is given: the earlier turns, then this question."""
        return [*self.context, {"role": "user", "content": self.prompt}]
