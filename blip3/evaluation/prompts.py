"""Prompts: the customary instruct prompts of each benchmark, and few-shot prompts for base models.

Instruct models get one user turn in the chat template, images first (LLaVA / VLMEvalKit style):

    short answer     <image>\\n{question}\\nAnswer the question using a single word or phrase.
    multiple choice  <image>\\n{hint}\\n{question}\\nA. {option}\\nB. {option}\\n...
                     Answer with the option's letter from the given choices directly.
    caption          <image>\\nProvide a one-sentence caption for the provided image.

Base (pre-trained) models get raw interleaved text in OpenFlamingo's evaluation format: k examples
from a support set, each closed by `<|endofchunk|>`, then the query with its answer left open:

    <image>Question: {question} Short answer: {answer}<|endofchunk|>      (k times)
    <image>Question: {question} Short answer:

and for captioning `<image>A short image description: {caption}<|endofchunk|>` ... then
`<image>A short image description:`. The query ends without a space, so the model writes the space
itself, as it did after every example's colon. Examples are drawn per item from a seeded generator
keyed by the item's id: the same item always gets the same examples, whatever else is in its batch.
Zero-shot follows OpenFlamingo too: its prompt holds `zero_shot_text_examples` (default 2) examples
as text only, without their images, so the model still sees the answer format.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Sequence

from blip3.evaluation.items import OPTION_LETTERS, VQA_ACCURACY, EvalItem
from blip3.processing.image import ImageSource
from blip3.processing.tokenizer import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
# LLaVA's VizWiz prompt: VizWiz questions may be unanswerable from the photo.
UNANSWERABLE_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."

BASE_QUESTION_PREFIX = "Question:"
BASE_ANSWER_PREFIX = "Short answer:"
BASE_CAPTION_PREFIX = "A short image description:"
ZERO_SHOT_TEXT_EXAMPLES = 2


# ---------------------------------------------------------------------------------------------------
# Instruct prompts


def image_prefix(num_images: int) -> str:
    return f"{IMAGE_TOKEN}\n" * num_images


def short_answer_prompt(question: str, num_images: int = 1, instruction: str = SHORT_ANSWER_INSTRUCTION) -> str:
    return f"{image_prefix(num_images)}{question}\n{instruction}"


def format_options(choices: Sequence[str]) -> str:
    """The options one per line, lettered: "A. first", "B. second", ..."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTION_LETTERS, choices))


def multiple_choice_prompt(question: str, choices: Sequence[str], hint: str | None = None, num_images: int = 1) -> str:
    hint_line = f"{hint}\n" if hint else ""
    return f"{image_prefix(num_images)}{hint_line}{question}\n{format_options(choices)}\n{MULTIPLE_CHOICE_INSTRUCTION}"


def caption_prompt(num_images: int = 1) -> str:
    return f"{image_prefix(num_images)}{CAPTION_INSTRUCTION}"


# ---------------------------------------------------------------------------------------------------
# Base-model few-shot prompts


def base_prompt(
    item: EvalItem, shots: Sequence[EvalItem], text_only_shots: bool = False
) -> tuple[str, list[ImageSource]]:
    """The raw few-shot prompt of `item` and its images, in `<image>` order (examples first)."""
    text, images = "", []
    for shot in shots:
        answer = shot.references[0] if shot.references else ""
        block, block_images = _base_block(shot, answer, with_images=not text_only_shots)
        text += block
        images += block_images
    block, block_images = _base_block(item, None, with_images=True)
    return text + block, images + block_images


def _base_block(item: EvalItem, answer: str | None, with_images: bool) -> tuple[str, list[ImageSource]]:
    images = list(item.images) if with_images else []
    if item.question is None:
        text = f"{IMAGE_TOKEN * len(images)}{BASE_CAPTION_PREFIX}"
    else:
        # Base prompts put every image first; `<image>` markers inside a question would misplace them.
        question = " ".join(item.question.replace(IMAGE_TOKEN, " ").split())
        text = f"{IMAGE_TOKEN * len(images)}{BASE_QUESTION_PREFIX} {question} {BASE_ANSWER_PREFIX}"
    if answer is not None:
        text += f" {answer.strip()}{END_OF_CHUNK_TOKEN}"
    return text, images


def select_shots(item: EvalItem, support: Sequence[EvalItem], num_shots: int, seed: int = 0) -> list[EvalItem]:
    """`num_shots` examples for `item` from `support`, chosen by a generator seeded with (seed, item id).

    An example is never the item itself, never shows one of the item's images (a caption of the same
    image would give the answer away), and comes from the same task. Raises if too few qualify.
    """
    if num_shots <= 0:
        return []
    rng = random.Random(f"{seed}:{item.id}")
    query_images = {_image_key(image) for image in item.images}
    chosen, tried = [], set()
    # Random probing rather than a filtered copy of the support set: O(shots) per item on large sets.
    while len(chosen) < num_shots and len(tried) < len(support):
        index = rng.randrange(len(support))
        if index in tried:
            continue
        tried.add(index)
        candidate = support[index]
        if (
            candidate.id != item.id
            and candidate.task == item.task
            and candidate.references
            and not query_images & {_image_key(image) for image in candidate.images}
        ):
            chosen.append(candidate)
    if len(chosen) < num_shots:
        raise ValueError(
            f"the support set has only {len(chosen)} usable examples for item {item.id!r}, {num_shots} needed"
        )
    return chosen


def _image_key(image: ImageSource) -> object:
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha1(bytes(image)).hexdigest()
    return id(image)  # an in-memory image: only the same object counts as the same image


# ---------------------------------------------------------------------------------------------------
# Answers

# Where a base model starts writing the next example instead of stopping.
_NEXT_EXAMPLE = re.compile(
    "|".join(re.escape(marker) for marker in (BASE_QUESTION_PREFIX, BASE_ANSWER_PREFIX, BASE_CAPTION_PREFIX, "\n"))
)


def clean_base_answer(text: str, item: EvalItem) -> str:
    """A base model's answer: cut where it starts another example; for VQA, at the first ", " too.

    The comma cut is OpenFlamingo's `postprocess_vqa_generation` (a short answer is one phrase).
    """
    text = _NEXT_EXAMPLE.split(text, maxsplit=1)[0]
    if item.metric == VQA_ACCURACY:
        text = text.split(", ", 1)[0]
    return text.strip()
