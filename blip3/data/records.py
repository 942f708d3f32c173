"""Typed records for every kind of training data, parsed from the raw rows the readers find.

A reader (`blip3.data.readers`) turns a file into `Row`s: a tar sample's members, or one JSON object /
table row. `parse_record(row, format)` checks the row against its format's schema and returns one of
the records below, or raises `BadSample` naming the reason. Images stay encoded here (`bytes`, or a
`Path` to a file) so that a record is cheap; `blip3.data.formats` decodes them.

Schemas (what the synthetic world writes and what real datasets are converted to):

caption (`CaptionPair`)
    webdataset: `<key>.png|jpg|jpeg|webp` + `<key>.txt` (the caption); an optional `<key>.json` holds
    metadata (it must still be valid JSON). Tables: `{"image": <image>, "caption": str}` (or `"text"`).
interleaved (`InterleavedDocument`)
    webdataset: `<key>.json` = `{"texts": [str|null, ...], "images": [str|null, ...]}`, OBELICS-style
    aligned lists: each position holds a text chunk or an image member name such as `"0.png"`, stored as
    `<key>.0.png`, `<key>.1.png`, ... Tables: the same two columns, images as <image> values.
ocr (`OcrSample`, BLIP3-OCR-200M style)
    webdataset: `<key>.png` + `<key>.json` = `{"ocr": [{"text": str, "box": [x1, y1, x2, y2]}],
    "caption": str (optional)}`; boxes normalised to [0, 1], x horizontal, box optional per region.
    Tables: `{"image", "ocr", "caption"}` (`ocr` may be a JSON string).
grounding (`GroundingSample`, BLIP3-GROUNDING-50M style)
    webdataset: `<key>.png` + `<key>.json` = `{"caption": str, "objects": [{"phrase": str, "box":
    [x1, y1, x2, y2]}]}`. Tables: `{"image", "caption", "objects"}` (`objects` may be a JSON string).
conversation (`ConversationSample`, LLaVA)
    `{"id", "image": "rel/path.png" | ["a.png", "b.png"] | absent, "conversations": [{"from":
    "human"|"gpt"|"system", "value": str}]}` (chat-style `{"role", "content"}` messages work too);
    `<image>` marks where the images go; tables may hold the images as bytes under `"image"`/`"images"`.
preference (`PreferencePair`, VLFeedback-like)
    `{"id", "images": [<image>, ...], "prompt": str (with <image>) | [messages], "chosen": str,
    "rejected": str, "scores": {...} (optional)}`.

An <image> value in a table is encoded bytes, a `{"bytes": ..., "path": ...}` dict (HF `datasets`
Image columns, parquet structs), or a path relative to the source's `image_root` (absolute paths are
used as they are). In a tar sample it is the name of a member, with or without the `<key>.` prefix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Why a sample is skipped


class SkipReason(StrEnum):
    """Why a sample was skipped; the keys of the skip counters."""

    UNREADABLE_FILE = "unreadable_file"  # a tar / parquet / JSON file that is missing, empty or corrupt
    UNREADABLE_JSON = "unreadable_json"  # one sample's JSON (tar member, JSONL line) does not parse
    DUPLICATE_MEMBER = "duplicate_member"  # a tar sample with two members of the same name
    MISSING_FIELD = "missing_field"  # a required field is absent or null
    INVALID_FIELD = "invalid_field"  # a field of the wrong type or value (e.g. a box outside [0, 1])
    EMPTY_TEXT = "empty_text"  # nothing to train on: an empty caption, chosen or rejected answer
    MISSING_IMAGE = "missing_image"  # an image reference that is null or names no file / member
    EMPTY_IMAGE = "empty_image"  # a zero-byte image
    CORRUPT_IMAGE = "corrupt_image"  # truncated, corrupt or not an image at all
    IMAGE_TOO_LARGE = "image_too_large"  # more pixels than the processor accepts (decompression bombs)
    TOO_MANY_IMAGES = "too_many_images"  # more images than `max_images`
    IMAGE_TOKEN_MISMATCH = "image_token_mismatch"  # <image> tokens and images differ in number
    IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"  # a text-only sample containing <image>
    INVALID_CONVERSATION = "invalid_conversation"  # roles out of order, no answer, non-text turns
    TOKENIZATION_MISMATCH = "tokenization_mismatch"  # a preference prompt that is not a prefix of its answers
    TOO_LONG = "too_long"  # longer than `max_length` even after dropping trailing turns (or policy "skip")
    UNEXPECTED_ERROR = "unexpected_error"  # anything else: logged with its traceback
    INCOMPLETE_BATCH = "incomplete_batch"  # a good sample left in the last, incomplete batch (drop_last=True)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is its counter key, `detail` says what exactly is wrong."""

    def __init__(self, reason: SkipReason, detail: str, key: str = ""):
        super().__init__(f"{key}: {detail}" if key else detail)
        self.reason = SkipReason(reason)
        self.detail = detail
        self.key = key

    def __reduce__(self):  # picklable across DataLoader workers
        return (BadSample, (self.reason, self.detail, self.key))


# ---------------------------------------------------------------------------------------------------
# Raw rows, as readers produce them

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")

EncodedImage = bytes | Path  # an image not yet decoded: the bytes of its file, or the path to it


@dataclass
class Row:
    """One raw sample: a tar sample's members, or one JSON object / table row."""

    key: str  # unique within its source: "<shard>/<key>" for tar samples, "<file>#<row>" for table rows
    fields: Mapping[str, Any]  # the JSON object or table row; for a tar sample its `.json` member ({} if none)
    members: Mapping[str, bytes] | None = None  # tar samples only: members by suffix ("png", "txt", "0.png")
    image_root: Path | None = None  # where relative image paths of table rows are found

    def text_member(self, suffix: str) -> str | None:
        """A tar member decoded as UTF-8 text (None when the row has no such member)."""
        if self.members is None or suffix not in self.members:
            return None
        try:
            return self.members[suffix].decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample(SkipReason.INVALID_FIELD, f"member .{suffix} is not UTF-8 text: {err}", self.key) from err

    def image_members(self) -> list[str]:
        """Suffixes of the tar members that are images, in name order."""
        if self.members is None:
            return []
        return sorted(suffix for suffix in self.members if suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)

    def resolve_image(self, ref: Any, what: str = "image") -> EncodedImage:
        """The encoded image an <image> value (see the module docstring) refers to."""
        if ref is None:
            raise BadSample(SkipReason.MISSING_IMAGE, f"{what} is null", self.key)
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return bytes(ref)
        if isinstance(ref, Mapping) and ("bytes" in ref or "path" in ref):
            if ref.get("bytes") is not None:
                return bytes(ref["bytes"])
            return self.resolve_image(ref.get("path"), what)
        if not isinstance(ref, str):
            raise BadSample(
                SkipReason.INVALID_FIELD, f"{what} must be bytes or a name, got {type(ref).__name__}", self.key
            )
        if self.members is not None:
            tar_key = self.key.rsplit("/", 1)[-1]
            name = ref[len(tar_key) + 1 :] if ref.startswith(tar_key + ".") else ref
            if name not in self.members:
                raise BadSample(
                    SkipReason.MISSING_IMAGE, f"{what} names member {ref!r}, which the sample lacks", self.key
                )
            return self.members[name]
        path = Path(ref)
        if not path.is_absolute():
            if self.image_root is None:
                raise BadSample(
                    SkipReason.MISSING_IMAGE, f"{what} {ref!r} is relative but the source has no image_root", self.key
                )
            path = self.image_root / path
        if not path.is_file():
            raise BadSample(SkipReason.MISSING_IMAGE, f"{what} file {str(path)!r} does not exist", self.key)
        return path


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Box:
    """A box normalised to [0, 1]: (x1, y1) top-left, (x2, y2) bottom-right, x horizontal."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class CaptionPair:
    key: str
    image: EncodedImage
    caption: str


@dataclass(frozen=True)
class InterleavedDocument:
    key: str
    segments: tuple[str | EncodedImage, ...]  # text chunks (str) and images (bytes / Path), in document order

    @property
    def num_images(self) -> int:
        return sum(not isinstance(segment, str) for segment in self.segments)


@dataclass(frozen=True)
class OcrRegion:
    text: str
    box: Box | None


@dataclass(frozen=True)
class OcrSample:
    key: str
    image: EncodedImage
    regions: tuple[OcrRegion, ...]
    caption: str | None = None


@dataclass(frozen=True)
class GroundedObject:
    phrase: str
    box: Box


@dataclass(frozen=True)
class GroundingSample:
    key: str
    image: EncodedImage
    caption: str
    objects: tuple[GroundedObject, ...]


@dataclass(frozen=True)
class ConversationSample:
    key: str
    images: tuple[EncodedImage, ...]
    messages: tuple[Mapping[str, Any], ...]  # LLaVA ({"from", "value"}) or chat ({"role", "content"}) style


@dataclass(frozen=True)
class PreferencePair:
    key: str
    images: tuple[EncodedImage, ...]
    prompt: str | tuple[Mapping[str, Any], ...]  # a user message, or a conversation ending with a user turn
    chosen: str
    rejected: str
    scores: Mapping[str, Any] = field(default_factory=dict)


Record = CaptionPair | InterleavedDocument | OcrSample | GroundingSample | ConversationSample | PreferencePair
FORMATS = ("caption", "interleaved", "ocr", "grounding", "conversation", "preference")


# ---------------------------------------------------------------------------------------------------
# Parsing


def parse_record(row: Row, format: str) -> Record:
    """The record of `format` that `row` holds; raises `BadSample` when it does not follow the schema."""
    if format not in _PARSERS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if not isinstance(row.fields, Mapping):
        raise BadSample(SkipReason.INVALID_FIELD, f"expected a JSON object, got {type(row.fields).__name__}", row.key)
    return _PARSERS[format](row)


def _parse_caption(row: Row) -> CaptionPair:
    caption = row.text_member("txt")
    if caption is None:
        caption = _optional_str(row, "caption")
        if caption is None:
            caption = _optional_str(row, "text")
    if caption is None:
        raise BadSample(SkipReason.MISSING_FIELD, "no caption (.txt member or 'caption' field)", row.key)
    if not caption.strip():
        raise BadSample(SkipReason.EMPTY_TEXT, "the caption is empty", row.key)
    return CaptionPair(row.key, _single_image(row), caption)


def _parse_interleaved(row: Row) -> InterleavedDocument:
    texts, images = _list_field(row, "texts"), _list_field(row, "images")
    if len(texts) != len(images):
        raise BadSample(
            SkipReason.INVALID_FIELD, f"'texts' has {len(texts)} entries but 'images' {len(images)}", row.key
        )
    segments, referenced = [], set()
    for position, (text, image) in enumerate(zip(texts, images)):
        if text is not None and image is not None:
            raise BadSample(SkipReason.INVALID_FIELD, f"position {position} holds both a text and an image", row.key)
        if image is not None:
            segments.append(row.resolve_image(image, f"image at position {position}"))
            if isinstance(image, str):
                referenced.add(image)
        elif text is not None:
            if not isinstance(text, str):
                raise BadSample(SkipReason.INVALID_FIELD, f"text at position {position} is not a string", row.key)
            segments.append(text)
    if not any(isinstance(segment, str) and segment.strip() for segment in segments):
        raise BadSample(SkipReason.EMPTY_TEXT, "the document has no text", row.key)
    # Images stored with a tar sample but missing from its lists would silently be dropped otherwise.
    tar_key = row.key.rsplit("/", 1)[-1]
    unreferenced = [m for m in row.image_members() if m not in referenced and f"{tar_key}.{m}" not in referenced]
    if unreferenced:
        raise BadSample(
            SkipReason.IMAGE_TOKEN_MISMATCH, f"image members {unreferenced} are not placed in 'images'", row.key
        )
    return InterleavedDocument(row.key, tuple(segments))


def _parse_ocr(row: Row) -> OcrSample:
    entries = _json_list_field(row, "ocr")
    regions = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise BadSample(SkipReason.INVALID_FIELD, f"ocr[{index}] is not an object", row.key)
        text = entry.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadSample(SkipReason.INVALID_FIELD, f"ocr[{index}] has no text", row.key)
        box = entry.get("box")
        regions.append(OcrRegion(text.strip(), None if box is None else _box(row, box, f"ocr[{index}].box")))
    if not regions:
        raise BadSample(SkipReason.EMPTY_TEXT, "no OCR regions", row.key)
    return OcrSample(row.key, _single_image(row), tuple(regions), _optional_str(row, "caption"))


def _parse_grounding(row: Row) -> GroundingSample:
    caption = _optional_str(row, "caption")
    if caption is None:
        raise BadSample(SkipReason.MISSING_FIELD, "no 'caption'", row.key)
    objects = []
    for index, entry in enumerate(_json_list_field(row, "objects")):
        if not isinstance(entry, Mapping):
            raise BadSample(SkipReason.INVALID_FIELD, f"objects[{index}] is not an object", row.key)
        phrase = entry.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            raise BadSample(SkipReason.INVALID_FIELD, f"objects[{index}] has no phrase", row.key)
        if entry.get("box") is None:
            raise BadSample(SkipReason.INVALID_FIELD, f"objects[{index}] has no box", row.key)
        objects.append(GroundedObject(phrase.strip(), _box(row, entry["box"], f"objects[{index}].box")))
    if not caption.strip() and not objects:
        raise BadSample(SkipReason.EMPTY_TEXT, "no caption and no objects", row.key)
    return GroundingSample(row.key, _single_image(row), caption.strip(), tuple(objects))


def _parse_conversation(row: Row) -> ConversationSample:
    messages = _json_list_field(row, "conversations")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadSample(SkipReason.INVALID_CONVERSATION, f"conversations[{index}] is not an object", row.key)
    images = _image_list(row, "image" if "image" in row.fields else "images")
    return ConversationSample(row.key, images, tuple(messages))


def _parse_preference(row: Row) -> PreferencePair:
    prompt = row.fields.get("prompt")
    if prompt is None:
        raise BadSample(SkipReason.MISSING_FIELD, "no 'prompt'", row.key)
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        prompt = _json_value(row, "prompt", prompt)
    if not isinstance(prompt, str):
        if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
            raise BadSample(SkipReason.INVALID_FIELD, "'prompt' must be a string or a list of messages", row.key)
        prompt = tuple(prompt)
    answers = {}
    for name in ("chosen", "rejected"):
        answer = _optional_str(row, name)
        if answer is None:
            raise BadSample(SkipReason.MISSING_FIELD, f"no '{name}'", row.key)
        if not answer.strip():
            raise BadSample(SkipReason.EMPTY_TEXT, f"'{name}' is empty", row.key)
        answers[name] = answer
    scores = row.fields.get("scores") or {}
    if isinstance(scores, str):
        scores = _json_value(row, "scores", scores)
    if not isinstance(scores, Mapping):
        raise BadSample(SkipReason.INVALID_FIELD, "'scores' must be an object", row.key)
    images = _image_list(row, "images" if "images" in row.fields else "image")
    return PreferencePair(row.key, images, prompt, answers["chosen"], answers["rejected"], dict(scores))


_PARSERS = {
    "caption": _parse_caption,
    "interleaved": _parse_interleaved,
    "ocr": _parse_ocr,
    "grounding": _parse_grounding,
    "conversation": _parse_conversation,
    "preference": _parse_preference,
}


# ---------------------------------------------------------------------------------------------------
# Field helpers


def _single_image(row: Row) -> EncodedImage:
    """The one image of a caption / OCR / grounding sample."""
    if row.members is not None:
        names = row.image_members()
        if not names:
            raise BadSample(SkipReason.MISSING_IMAGE, "no image member (.png/.jpg/.jpeg/.webp)", row.key)
        if len(names) > 1:
            raise BadSample(
                SkipReason.IMAGE_TOKEN_MISMATCH, f"{len(names)} image members {names} for one <image>", row.key
            )
        return row.members[names[0]]
    return row.resolve_image(row.fields.get("image"))


def _image_list(row: Row, name: str) -> tuple[EncodedImage, ...]:
    """The images of a conversation / preference pair: a single value, a list, or none."""
    value = row.fields.get(name)
    if value is None:
        if row.members is not None:  # a tar sample: its image members, in name order
            return tuple(row.members[m] for m in row.image_members())
        return ()
    if isinstance(value, (str, bytes, bytearray, memoryview, Mapping)):
        value = [value]
    if not isinstance(value, Sequence):
        raise BadSample(SkipReason.INVALID_FIELD, f"'{name}' must be an image or a list of images", row.key)
    return tuple(row.resolve_image(ref, f"{name}[{index}]") for index, ref in enumerate(value))


def _optional_str(row: Row, name: str) -> str | None:
    value = row.fields.get(name)
    if value is not None and not isinstance(value, str):
        raise BadSample(SkipReason.INVALID_FIELD, f"'{name}' must be a string, got {type(value).__name__}", row.key)
    return value


def _json_value(row: Row, name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample(SkipReason.UNREADABLE_JSON, f"'{name}' holds invalid JSON: {err}", row.key) from err


def _list_field(row: Row, name: str) -> list:
    value = row.fields.get(name)
    if value is None:
        raise BadSample(SkipReason.MISSING_FIELD, f"no '{name}'", row.key)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise BadSample(SkipReason.INVALID_FIELD, f"'{name}' must be a list, got {type(value).__name__}", row.key)
    return list(value)


def _json_list_field(row: Row, name: str) -> list:
    """A list field that tables may store as a JSON string (as the released BLIP3 parquet files do)."""
    value = row.fields.get(name)
    if isinstance(value, str):
        row = Row(row.key, {name: _json_value(row, name, value)})
    return _list_field(row, name)


_BOX_TOLERANCE = 1e-6  # float noise from writers that computed boxes in pixels and divided


def _box(row: Row, value: Any, what: str) -> Box:
    if (
        isinstance(value, (str, bytes, Mapping))
        or not isinstance(value, Sequence)
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise BadSample(SkipReason.INVALID_FIELD, f"{what} must be 4 numbers [x1, y1, x2, y2], got {value!r}", row.key)
    x1, y1, x2, y2 = (float(v) for v in value)
    inside = all(-_BOX_TOLERANCE <= v <= 1 + _BOX_TOLERANCE for v in (x1, y1, x2, y2))
    if not inside or x2 < x1 or y2 < y1:
        raise BadSample(
            SkipReason.INVALID_FIELD,
            f"{what} {list(value)} is not a box normalised to [0, 1] with x1≤x2, y1≤y2",
            row.key,
        )
    clamp = lambda v: min(max(v, 0.0), 1.0)
    return Box(clamp(x1), clamp(y1), clamp(x2), clamp(y2))
