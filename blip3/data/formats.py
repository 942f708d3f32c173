"""Formats: records -> model-ready examples (token ids, labels, image tiles), through the processor.

Pre-training text (REFERENCE §3.4, from the OpenFlamingo lineage); labels are the input ids, except
that the pad and the three added tokens (`<image>`, `<image placeholder>`, `<|endofchunk|>`) are -100,
as the model's loss would treat them anyway:

    caption       `<image>` + caption + `<|endofchunk|>`
    ocr           the same, the caption being the OCR text rendered at a granularity (`ocr_text`)
    grounding     the same, the caption with each object's box after its phrase (`grounded_caption`)
    interleaved   every image becomes `<|endofchunk|><image>` before the text that follows it, chunks
                  are joined by a space, the first `<|endofchunk|>` is removed, and `<|endofchunk|>` +
                  eos are appended (`interleaved_text`)

Conversations (§3.1-3.2) go through `Blip3Processor.process_conversations`: the chat template, the
default system prompt when a sample has none, labels on the answers only. LLaVA's image rules apply
first: a single-image sample whose first human turn does not hold exactly one `<image>` gets them all
removed and `<image>\\n` put in front; otherwise the `<image>` count must equal the image count.

`max_length` bounds the *spliced* length (text tokens − images + each image's vision tokens, as the
processor counts them). Over it, `overlong="skip"` skips the sample; `"drop_turns"` drops whole
trailing exchanges of a conversation, and cuts a pre-training text at a token boundary where every
image before the cut is whole and images after it are dropped with their text — never into an image.
A sample that still does not fit is skipped (`too_long`).

Preference pairs: `tokenize_preference_pair` gives the prompt ids and the chosen / rejected sequences
with labels on the response only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from blip3.config import IGNORE_INDEX
from blip3.data.records import (
    BadSample,
    Box,
    CaptionPair,
    ConversationSample,
    EncodedImage,
    GroundingSample,
    InterleavedDocument,
    OcrSample,
    PreferencePair,
    Record,
    Row,
    SkipReason,
    parse_record,
)
from blip3.processing.chat import XGENMM_SYSTEM_PROMPT, Turn, encode, parse_conversation
from blip3.processing.image import ImageError, ImageTooLargeError, load_image
from blip3.processing.processor import Blip3Processor
from blip3.processing.tokenizer import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

Overlong = Literal["drop_turns", "skip"]
OCR_LEVELS = 6  # REFERENCE §5.3: quoted text, coarse position, fractions, rounded box, 3-decimal box, tags
GROUNDING_LEVELS = 3  # coarse position phrase, "starts at ... extends up to ...", <bbox> tags


@dataclass
class Example:
    """One sample, ready to collate: the processor's output for it alone, without padding."""

    key: str  # "<source>:<row key>"
    input_ids: torch.Tensor  # [T] int64, one <image> per image
    labels: torch.Tensor  # [T] int64, -100 where nothing is trained
    pixel_values: torch.Tensor | None  # [ΣNp, 3, S, S] tiles of its images (None without images)
    image_sizes: torch.Tensor  # [N, 2] (W, H)
    num_tiles: torch.Tensor  # [N]
    length: int  # positions after splicing (what max_length bounds)
    truncated: bool = False  # trailing turns or text were dropped to fit max_length

    @property
    def num_images(self) -> int:
        return len(self.num_tiles)


@dataclass
class PreferenceExample:
    """A tokenised preference pair: both answers after the same prompt, labels on the answers only."""

    key: str
    prompt_input_ids: torch.Tensor  # [P]: system + user turn(s), ending with `<|assistant|>\\n`
    chosen: Example  # prompt + chosen answer; its input ids start with prompt_input_ids
    rejected: Example  # prompt + rejected answer (the same images)

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


# ---------------------------------------------------------------------------------------------------
# Text renderings


def caption_text(caption: str) -> str:
    return f"{IMAGE_TOKEN}{caption.strip()}{END_OF_CHUNK_TOKEN}"


def interleaved_text(segments: Sequence[str | Any], eos_token: str) -> str:
    """OpenFlamingo's MMC4 text: `segments` are text chunks (str) and images (anything else)."""
    pieces = [
        segment.strip() if isinstance(segment, str) else f"{END_OF_CHUNK_TOKEN}{IMAGE_TOKEN}" for segment in segments
    ]
    text = " ".join(piece for piece in pieces if piece)
    text = text.replace(END_OF_CHUNK_TOKEN, "", 1)  # the first image opens the document, it closes no chunk
    text = text.replace(f" {END_OF_CHUNK_TOKEN}", END_OF_CHUNK_TOKEN)
    text = text.replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN).replace(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    return f"{text}{END_OF_CHUNK_TOKEN}{eos_token}"


def coarse_position(box: Box) -> str:
    """Where a box's centre lies in a 3×3 grid of the image, in words ("at the top left", "in the center")."""
    row = _third((box.y1 + box.y2) / 2)
    column = _third((box.x1 + box.x2) / 2)
    return _POSITION_PHRASES[row][column]


_POSITION_PHRASES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)


def _third(value: float) -> int:
    return min(int(value * 3), 2)


def _point(x: float, y: float, decimals: int, brackets: str = "[]") -> str:
    return f"{brackets[0]}{x:.{decimals}f}, {y:.{decimals}f}{brackets[1]}"


def _fraction(value: float) -> str:
    fraction = Fraction(value).limit_denominator(20)
    return f"{fraction.numerator}/{fraction.denominator}"


def ocr_region_text(text: str, box: Box | None, level: int) -> str:
    """One OCR region at a BLIP3-OCR-200M granularity (REFERENCE §5.3 L1-L6 are levels 0-5 here).

    A region without a box is always rendered at level 0 (its quoted text).
    """
    if not 0 <= level < OCR_LEVELS:
        raise ValueError(f"OCR granularity must be in 0..{OCR_LEVELS - 1}, got {level}")
    if box is None or level == 0:
        return f'"{text}"'
    if level == 1:
        return f'"{text}" located {coarse_position(box)}'
    if level == 2:
        down, across = _fraction((box.y1 + box.y2) / 2), _fraction((box.x1 + box.x2) / 2)
        return f'"{text}" at {down} of the image from top to bottom and {across} of the image from left to right'
    if level == 3:
        return f'"{text}" approximately starts at {_point(box.x1, box.y1, 1)} and extends up to {_point(box.x2, box.y2, 1)}'
    if level == 4:
        return f'"{text}" starts at {_point(box.x1, box.y1, 3)} and extends up to {_point(box.x2, box.y2, 3)}'
    return f"<ocr>{text}</ocr><bbox>{_point(box.x1, box.y1, 3)}{_point(box.x2, box.y2, 3)}</bbox>"


def ocr_text(sample: OcrSample, level: int, include_caption: bool = True) -> str:
    """The caption of an OCR sample: its own caption (if any) then every region at `level`."""
    body = ", ".join(ocr_region_text(region.text, region.box, level) for region in sample.regions)
    if include_caption and sample.caption and sample.caption.strip():
        return f"{sample.caption.strip()} {body}"
    return body


def grounding_info(box: Box, level: int) -> str:
    """An object's box in words at a BLIP3-GROUNDING-50M granularity (0 coarse, 1 extent, 2 <bbox> tags)."""
    if level == 0:
        return coarse_position(box)
    if level == 1:
        return f"starts at {_point(box.x1, box.y1, 2, '()')} and extends up to {_point(box.x2, box.y2, 2, '()')}"
    if level == 2:
        return f"<bbox>{_point(box.x1, box.y1, 2)}{_point(box.x2, box.y2, 2)}</bbox>"
    raise ValueError(f"grounding granularity must be in 0..{GROUNDING_LEVELS - 1}, got {level}")


def grounded_caption(sample: GroundingSample, level: int) -> str:
    """The caption with ` (box info)` after each object's phrase (its first whole-word occurrence after
    the previous object's); objects whose phrase is not in the caption are listed after it."""
    text, cursor, unplaced = sample.caption, 0, []
    for obj in sample.objects:
        annotated = f"{obj.phrase} ({grounding_info(obj.box, level)})"
        match = re.compile(rf"\b{re.escape(obj.phrase)}\b", re.IGNORECASE).search(text, cursor)
        if match is None:
            unplaced.append(annotated)
            continue
        text = text[: match.start()] + annotated + text[match.end() :]
        cursor = match.start() + len(annotated)
    if unplaced:
        text = f"{text} {', '.join(unplaced)}" if text else ", ".join(unplaced)
    return text


# ---------------------------------------------------------------------------------------------------
# Images


def load_record_image(image: EncodedImage | Any, key: str, max_pixels: int) -> Image.Image:
    """Decode one image of a record, turning every failure into a `BadSample` with its reason."""
    if isinstance(image, Path):
        if not image.is_file():
            raise BadSample(SkipReason.MISSING_IMAGE, f"image file {str(image)!r} does not exist", key)
        if image.stat().st_size == 0:
            raise BadSample(SkipReason.EMPTY_IMAGE, f"image file {str(image)!r} is empty (0 bytes)", key)
    elif isinstance(image, (bytes, bytearray, memoryview)) and len(image) == 0:
        raise BadSample(SkipReason.EMPTY_IMAGE, "image is empty (0 bytes)", key)
    try:
        return load_image(image, max_pixels)
    except ImageError as err:
        reason = SkipReason.IMAGE_TOO_LARGE if isinstance(err, ImageTooLargeError) else SkipReason.CORRUPT_IMAGE
        raise BadSample(reason, str(err), key) from err


# ---------------------------------------------------------------------------------------------------
# Formatting


_FORMAT_OPTIONS = {
    "caption": set(),
    "interleaved": set(),
    "ocr": {"granularity", "include_caption"},
    "grounding": {"granularity"},
    "conversation": {"system_prompt"},
    "preference": {"system_prompt"},
}
COMMON_OPTIONS = {"max_images"}


class Formatter:
    """Turns the rows of one source (one format) into `Example`s, or `PreferenceExample`s.

    options: per-format settings from the mixture — `max_images` (any format, overrides the loader's),
        `granularity` (ocr: levels 0-5, grounding: 0-2; an int or a list to draw from per sample; default
        all levels), `include_caption` (ocr, default true), `system_prompt` (conversation / preference;
        default the xGen-MM one, null for none).
    """

    def __init__(
        self,
        processor: Blip3Processor,
        format: str,
        *,
        max_length: int | None = None,
        overlong: Overlong = "drop_turns",
        max_images: int = 4,
        options: Mapping[str, Any] | None = None,
    ):
        if format not in _FORMAT_OPTIONS:
            raise ValueError(f"unknown format {format!r}; choose one of {tuple(_FORMAT_OPTIONS)}")
        if overlong not in ("drop_turns", "skip"):
            raise ValueError(f"overlong must be 'drop_turns' or 'skip', got {overlong!r}")
        options = dict(options or {})
        unknown = set(options) - _FORMAT_OPTIONS[format] - COMMON_OPTIONS
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)} for format {format!r}")
        self.processor, self.format = processor, format
        self.max_length, self.overlong = max_length, overlong
        self.max_images = int(options.get("max_images", max_images))
        self.system_prompt = options.get("system_prompt", XGENMM_SYSTEM_PROMPT)
        self.include_caption = bool(options.get("include_caption", True))
        levels = OCR_LEVELS if format == "ocr" else GROUNDING_LEVELS
        granularity = options.get("granularity", list(range(levels)))
        self.levels = [granularity] if isinstance(granularity, int) else list(granularity)
        if not self.levels or not all(isinstance(level, int) and 0 <= level < levels for level in self.levels):
            raise ValueError(f"granularity for {format!r} must be levels in 0..{levels - 1}, got {granularity!r}")

    def __call__(self, row: Row, rng: random.Random) -> Example | PreferenceExample:
        """The example of `row`; `rng` draws the rendering granularity. Raises `BadSample`."""
        return self.format_record(parse_record(row, self.format), rng)

    def format_record(self, record: Record, rng: random.Random) -> Example | PreferenceExample:
        if isinstance(record, CaptionPair):
            return self._pretraining(record.key, caption_text(record.caption), [record.image])
        if isinstance(record, OcrSample):
            text = ocr_text(record, rng.choice(self.levels), self.include_caption)
            return self._pretraining(record.key, caption_text(text), [record.image])
        if isinstance(record, GroundingSample):
            return self._pretraining(
                record.key, caption_text(grounded_caption(record, rng.choice(self.levels))), [record.image]
            )
        if isinstance(record, InterleavedDocument):
            self._check_image_limit(record.key, record.num_images)
            images = [segment for segment in record.segments if not isinstance(segment, str)]
            return self._pretraining(
                record.key, interleaved_text(record.segments, self.processor.tokenizer.eos_token), images
            )
        if isinstance(record, ConversationSample):
            return self._conversation(record)
        if isinstance(record, PreferencePair):
            return tokenize_preference_pair(
                record,
                self.processor,
                max_length=self.max_length,
                max_images=self.max_images,
                system_prompt=self.system_prompt,
            )
        raise TypeError(f"not a record: {type(record).__name__}")

    def _check_image_limit(self, key: str, num_images: int) -> None:
        if num_images > self.max_images:
            raise BadSample(
                SkipReason.TOO_MANY_IMAGES, f"{num_images} images, more than max_images={self.max_images}", key
            )

    def _load_images(self, key: str, images: Sequence[EncodedImage]) -> list[Image.Image]:
        max_pixels = self.processor.image_processor.max_image_pixels
        return [load_record_image(image, key, max_pixels) for image in images]

    # -- pre-training text --------------------------------------------------------------------------

    def _pretraining(self, key: str, text: str, images: Sequence[EncodedImage]) -> Example:
        processor = self.processor
        input_ids = processor.tokenizer(text)["input_ids"]
        num_slots = input_ids.count(processor.image_token_id)
        if num_slots != len(images):  # e.g. a caption that contains the text "<image>"
            raise BadSample(
                SkipReason.IMAGE_TOKEN_MISMATCH, f"{num_slots} <image> tokens for {len(images)} images", key
            )
        pil_images = self._load_images(key, images)
        costs = _position_costs(processor, input_ids, pil_images)
        truncated = False
        if self.max_length is not None and sum(costs) > self.max_length:
            if self.overlong == "skip":
                raise BadSample(
                    SkipReason.TOO_LONG, f"{sum(costs)} positions after splicing > max_length={self.max_length}", key
                )
            # Keep the longest prefix that fits; an image counts whole at its <image>, so a cut never falls
            # inside one, and images whose <image> is past the cut go with it.
            keep, total = 0, 0
            while keep < len(costs) and total + costs[keep] <= self.max_length:
                total += costs[keep]
                keep += 1
            if not any(token not in processor.ignored_label_ids for token in input_ids[1:keep]):
                raise BadSample(SkipReason.TOO_LONG, f"no text to train on fits max_length={self.max_length}", key)
            input_ids = input_ids[:keep]
            pil_images = pil_images[: input_ids.count(processor.image_token_id)]
            truncated = True
        labels = [IGNORE_INDEX if token in processor.ignored_label_ids else token for token in input_ids]
        return _example(processor, key, input_ids, labels, pil_images, truncated)

    # -- conversations ------------------------------------------------------------------------------

    def _conversation(self, record: ConversationSample) -> Example:
        key = record.key
        self._check_image_limit(key, len(record.images))
        turns = _parse_turns(record.messages, key, for_generation=False)
        turns = place_images(turns, len(record.images), key)
        images = self._load_images(key, record.images)
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        process = lambda truncation: self.processor.process_conversations(
            messages, images, system_prompt=self.system_prompt, max_length=self.max_length, truncation=truncation
        )
        truncated = False
        try:  # the image counts are checked above, so a ValueError here is the length
            inputs = process("error")
        except ValueError as err:
            if self.overlong == "skip":
                raise BadSample(SkipReason.TOO_LONG, str(err), key) from err
            try:
                inputs = process("drop_turns")
            except ValueError as err:
                raise BadSample(SkipReason.TOO_LONG, str(err), key) from err
            truncated = True
        num_images = int(inputs["num_images"][0]) if "num_images" in inputs else 0
        return _example(
            self.processor,
            key,
            inputs["input_ids"][0].tolist(),
            inputs["labels"][0].tolist(),
            images[:num_images],
            truncated,
            pixels=inputs if num_images else None,
        )


def _position_costs(processor: Blip3Processor, input_ids: list[int], images: list[Image.Image]) -> list[int]:
    """Positions each token takes after splicing: 1, or an image's vision tokens at its <image>."""
    vision = iter([processor.vision_tokens_per_image(image.size) for image in images])
    return [next(vision) if token == processor.image_token_id else 1 for token in input_ids]


def _example(
    processor: Blip3Processor,
    key: str,
    input_ids: list[int],
    labels: list[int],
    images: list[Image.Image],
    truncated: bool,
    pixels: Mapping[str, torch.Tensor] | None = None,
) -> Example:
    if images and pixels is None:
        pixels = processor.image_processor(images)
    length = sum(_position_costs(processor, input_ids, images))
    return Example(
        key=key,
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        pixel_values=pixels["pixel_values"] if images else None,
        image_sizes=pixels["image_sizes"] if images else torch.zeros((0, 2), dtype=torch.int64),
        num_tiles=pixels["num_tiles"] if images else torch.zeros((0,), dtype=torch.int64),
        length=length,
        truncated=truncated,
    )


# ---------------------------------------------------------------------------------------------------
# Conversation rules


def _parse_turns(messages: Sequence[Mapping[str, Any]], key: str, for_generation: bool) -> list[Turn]:
    # The older LLaVA preprocessing drops a conversation's leading answer turns (REFERENCE §5.1).
    messages = list(messages)
    while messages and _role(messages[0]) in ("gpt", "assistant"):
        messages.pop(0)
    try:
        return parse_conversation(messages, system_prompt=None, for_generation=for_generation)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise BadSample(SkipReason.INVALID_CONVERSATION, str(err), key) from err


def _role(message: Mapping[str, Any]) -> Any:
    return message.get("role", message.get("from"))


def place_images(turns: list[Turn], num_images: int, key: str = "") -> list[Turn]:
    """Check (and for single-image samples, fix) where the `<image>` tokens are (REFERENCE §3.1)."""
    counts = [turn.text.count(IMAGE_TOKEN) for turn in turns]
    if num_images == 0:
        if sum(counts):
            raise BadSample(SkipReason.IMAGE_TOKEN_WITHOUT_IMAGE, f"{sum(counts)} <image> in a text-only sample", key)
        return turns
    first_user = next(index for index, turn in enumerate(turns) if turn.role == "user")
    if num_images == 1 and counts[first_user] != 1:
        text = turns[first_user].text.replace(IMAGE_TOKEN, "").strip()
        turns = [*turns[:first_user], Turn("user", f"{IMAGE_TOKEN}\n{text}"), *turns[first_user + 1 :]]
        counts = [turn.text.count(IMAGE_TOKEN) for turn in turns]
    if sum(counts) != num_images:
        raise BadSample(SkipReason.IMAGE_TOKEN_MISMATCH, f"{sum(counts)} <image> tokens for {num_images} images", key)
    return turns


# ---------------------------------------------------------------------------------------------------
# Preference pairs


def tokenize_preference_pair(
    pair: PreferencePair,
    processor: Blip3Processor,
    *,
    max_length: int | None = None,
    max_images: int | None = None,
    system_prompt: str | None = XGENMM_SYSTEM_PROMPT,
) -> PreferenceExample:
    """Prompt ids, and the chosen and rejected sequences with labels on their answer only.

    `pair.images` may be encoded images (bytes, paths) or anything `load_image` takes. Raises
    `BadSample` for a pair that cannot be used (image counts, a prompt not ending with a user turn, an
    answer that does not fit `max_length`: a prompt is never cut, since that changes the question).
    """
    key = pair.key
    if max_images is not None and len(pair.images) > max_images:
        raise BadSample(
            SkipReason.TOO_MANY_IMAGES, f"{len(pair.images)} images, more than max_images={max_images}", key
        )
    prompt = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else list(pair.prompt)
    turns = _parse_turns(prompt, key, for_generation=True)
    if system_prompt is not None and turns[0].role != "system":
        turns = [Turn("system", system_prompt), *turns]
    turns = place_images(turns, len(pair.images), key)
    images = [load_record_image(image, key, processor.image_processor.max_image_pixels) for image in pair.images]
    prompt_ids = encode(processor.tokenizer, turns).input_ids
    pixels = processor.image_processor(images) if images else None

    def answer(text: str) -> Example:
        encoded = encode(processor.tokenizer, [*turns, Turn("assistant", text)])
        if encoded.input_ids[: len(prompt_ids)] != prompt_ids:
            raise BadSample(SkipReason.TOKENIZATION_MISMATCH, "the prompt's tokens change when an answer follows", key)
        # Earlier answers inside a multi-turn prompt are context here, not the response being compared.
        labels = [IGNORE_INDEX] * len(prompt_ids) + [
            IGNORE_INDEX if token in processor.ignored_label_ids else label
            for token, label in zip(encoded.input_ids[len(prompt_ids) :], encoded.labels[len(prompt_ids) :])
        ]
        example = _example(processor, key, encoded.input_ids, labels, images, False, pixels)
        if max_length is not None and example.length > max_length:
            raise BadSample(
                SkipReason.TOO_LONG, f"{example.length} positions after splicing > max_length={max_length}", key
            )
        return example

    return PreferenceExample(
        key, torch.tensor(prompt_ids, dtype=torch.int64), answer(pair.chosen), answer(pair.rejected)
    )
