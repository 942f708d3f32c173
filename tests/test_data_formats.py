"""Records and formats: schemas, the pre-training texts, OCR / grounding renderings, conversation rules,
over-long samples, preference pairs, and every bad-sample kind raising its own reason."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.config import IGNORE_INDEX
from blip3.data.formats import (
    Formatter,
    caption_text,
    coarse_position,
    grounded_caption,
    interleaved_text,
    ocr_region_text,
    tokenize_preference_pair,
)
from blip3.data.records import (
    BadSample,
    Box,
    GroundedObject,
    GroundingSample,
    InterleavedDocument,
    PreferencePair,
    Row,
    SkipReason,
    parse_record,
)
from blip3.data.testing import bad_image, odd_image, png_bytes

RNG = np.random.default_rng(0)
PNG = png_bytes(RNG, (64, 48))
EOC, IMG = "<|endofchunk|>", "<image>"


def tar_row(key: str = "shard.tar/k", **members: bytes | str) -> Row:
    """A tar sample's row; `json_` / `txt` / `png` / `0_png` keyword names become member suffixes."""
    import json

    data = {
        name.replace("_", "."): value.encode() if isinstance(value, str) else value for name, value in members.items()
    }
    fields = json.loads(data["json"]) if "json" in data else {}
    return Row(key, fields, data)


def fmt(processor, format: str, row: Row, seed: int = 0, **options):
    formatter_options = {k: v for k, v in options.items() if k not in ("max_length", "overlong", "max_images")}
    settings_ = {k: v for k, v in options.items() if k in ("max_length", "overlong", "max_images")}
    return Formatter(processor, format, options=formatter_options, **settings_)(row, random.Random(seed))


def reason_of(processor, format: str, row: Row, **options) -> str:
    with pytest.raises(BadSample) as raised:
        fmt(processor, format, row, **options)
    return raised.value.reason.value


# ---------------------------------------------------------------------------------------------------
# Pre-training texts (REFERENCE §3.4)


def test_caption_text_is_image_caption_endofchunk():
    assert caption_text("  a red circle ") == f"{IMG}a red circle{EOC}"


def test_interleaved_text_follows_openflamingo():
    segments = ["Intro text.", b"img0", "After the first image.", b"img1", "End."]
    assert interleaved_text(segments, "</eos>") == (
        f"Intro text.{IMG}After the first image.{EOC}{IMG}End.{EOC}</eos>"  # first <|endofchunk|> removed
    )
    assert interleaved_text([b"img", "Caption first."], "E") == f"{IMG}Caption first.{EOC}E"
    assert interleaved_text(["a", "b"], "E") == f"a b{EOC}E"


def test_caption_example_labels_and_images(processor):
    example = fmt(processor, "caption", tar_row(png=PNG, txt="a red circle"))
    ids = processor.tokenizer(caption_text("a red circle"))["input_ids"]
    assert example.input_ids.tolist() == ids
    # labels = input ids, except the added tokens (here <image> and <|endofchunk|>), which are never targets
    expected = [IGNORE_INDEX if t in processor.ignored_label_ids else t for t in ids]
    assert example.labels.tolist() == expected
    assert example.image_sizes.tolist() == [[64, 48]]
    assert example.pixel_values.shape == (int(example.num_tiles.sum()), 3, 28, 28)
    assert example.length == len(ids) - 1 + processor.vision_tokens_per_image((64, 48))


def test_interleaved_example_binds_images_in_order(processor):
    import json

    first, second = png_bytes(RNG, (30, 60)), png_bytes(RNG, (90, 30))
    row = Row(
        "docs.tar/d",
        json.loads('{"texts": ["Hello.", null, "Middle.", null], "images": [null, "0.png", null, "d.1.png"]}'),
        {"json": b"", "0.png": first, "1.png": second},
    )
    example = fmt(processor, "interleaved", row)
    assert example.image_sizes.tolist() == [[30, 60], [90, 30]]
    text = processor.tokenizer.decode(example.input_ids)
    assert text.endswith(f"{EOC}{processor.tokenizer.eos_token}")
    assert text.count(IMG) == 2
    assert example.labels[-1] == processor.tokenizer.eos_token_id  # eos is trained on


def test_odd_images_are_decoded_not_skipped(processor):
    for kind in ("cmyk", "palette", "gray16", "rgba", "exif_rotated", "greyscale", "webp"):
        data, extension = odd_image(kind, RNG, (60, 40))
        example = fmt(processor, "caption", tar_row(**{extension: data, "txt": "odd"}))
        expected = [40, 60] if kind == "exif_rotated" else [60, 40]  # EXIF orientation 6 turns it
        assert example.image_sizes.tolist() == [expected], kind


# ---------------------------------------------------------------------------------------------------
# OCR and grounding renderings (REFERENCE §5.3)


BOX = Box(0.192, 0.037, 0.817, 0.203)


@pytest.mark.parametrize(
    "level, expected",
    [
        (0, '"MACK SHOP"'),
        (1, '"MACK SHOP" located at the top'),
        (2, '"MACK SHOP" at 2/17 of the image from top to bottom and 1/2 of the image from left to right'),
        (3, '"MACK SHOP" approximately starts at [0.2, 0.0] and extends up to [0.8, 0.2]'),
        (4, '"MACK SHOP" starts at [0.192, 0.037] and extends up to [0.817, 0.203]'),
        (5, "<ocr>MACK SHOP</ocr><bbox>[0.192, 0.037][0.817, 0.203]</bbox>"),
    ],
)
def test_ocr_granularities(level, expected):
    assert ocr_region_text("MACK SHOP", BOX, level) == expected


def test_ocr_region_without_box_is_quoted_at_every_level():
    assert {ocr_region_text("OPEN", None, level) for level in range(6)} == {'"OPEN"'}


@pytest.mark.parametrize(
    "center, phrase",
    [
        ((0.1, 0.1), "at the top left"),
        ((0.5, 0.5), "in the center"),
        ((0.9, 0.5), "on the right"),
        ((0.5, 0.95), "at the bottom"),
    ],
)
def test_coarse_position(center, phrase):
    x, y = center
    assert coarse_position(Box(x, y, x, y)) == phrase


def test_grounded_caption_levels_and_placement():
    sample = GroundingSample(
        "k",
        PNG,
        "a red circle next to a blue square",
        (GroundedObject("red circle", Box(0.12, 0.3, 0.4, 0.62)), GroundedObject("star", Box(0, 0, 0.2, 0.2))),
    )
    assert grounded_caption(sample, 2) == (
        "a red circle (<bbox>[0.12, 0.30][0.40, 0.62]</bbox>) next to a blue square star (<bbox>[0.00, 0.00][0.20, 0.20]</bbox>)"
    )
    assert grounded_caption(sample, 1).startswith(
        "a red circle (starts at (0.12, 0.30) and extends up to (0.40, 0.62)) next"
    )
    assert grounded_caption(sample, 0).startswith("a red circle (on the left) next to")
    # whole words only: "cat" is not found inside "concatenate"
    word = GroundingSample("k", PNG, "concatenate a cat", (GroundedObject("cat", Box(0, 0, 1, 1)),))
    assert grounded_caption(word, 0) == "concatenate a cat (in the center)"


def test_granularity_option_and_seeded_choice(processor):
    row = tar_row(png=PNG, json='{"ocr": [{"text": "EXIT", "box": [0.1, 0.1, 0.3, 0.2]}]}')
    only_tags = {
        processor.tokenizer.decode(fmt(processor, "ocr", row, seed=s, granularity=5).input_ids) for s in range(5)
    }
    assert len(only_tags) == 1 and "<ocr>EXIT</ocr>" in only_tags.pop()
    drawn = [processor.tokenizer.decode(fmt(processor, "ocr", row, seed=s).input_ids) for s in range(40)]
    assert len(set(drawn)) == 6  # all six levels by default
    assert drawn == [processor.tokenizer.decode(fmt(processor, "ocr", row, seed=s).input_ids) for s in range(40)]
    with pytest.raises(ValueError, match="granularity"):
        Formatter(processor, "grounding", options={"granularity": [3]})


# ---------------------------------------------------------------------------------------------------
# Conversations (REFERENCE §3.1)


def llava_row(conversations, image=None, root: Path | None = None) -> Row:
    fields = {"id": "x", "conversations": conversations}
    if image is not None:
        fields["image"] = image
    return Row("sft.json#0", fields, image_root=root)


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for name, size in (("a.png", (64, 48)), ("b.png", (40, 80))):
        (tmp_path / name).write_bytes(png_bytes(RNG, size))
    return tmp_path


def test_conversation_matches_process_conversations(processor, images):
    from PIL import Image

    conversation = [human("<image>\nWhat is it?"), gpt("A circle."), human("Sure?"), gpt("Yes.")]
    example = fmt(processor, "conversation", llava_row(conversation, "a.png", images))
    expected = processor.process_conversations(conversation, [Image.open(images / "a.png")])
    assert example.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert example.labels.tolist() == expected["labels"][0].tolist()  # answers only
    assert torch.equal(example.pixel_values, expected["pixel_values"])


@pytest.mark.parametrize(
    "question, rendered",
    [
        ("What is it?", f"{IMG}\nWhat is it?"),  # no <image>: one is put in front
        ("<image> and <image>?", f"{IMG}\nand ?"),  # two for one image: removed, one put in front
        ("Look: <image>", f"Look: {IMG}"),  # exactly one: left where it is
    ],
)
def test_single_image_question_gets_exactly_one_image_token(processor, images, question, rendered):
    example = fmt(processor, "conversation", llava_row([human(question), gpt("A.")], "a.png", images))
    assert f"<|user|>\n{rendered}<|end|>" in processor.tokenizer.decode(example.input_ids)


def test_leading_answer_is_dropped(processor, images):
    example = fmt(
        processor, "conversation", llava_row([gpt("Hello."), human("<image>\nQ"), gpt("A.")], "a.png", images)
    )
    assert "Hello." not in processor.tokenizer.decode(example.input_ids)


def test_multi_image_conversation_keeps_token_places(processor, images):
    conversation = [human("First <image>, then <image>. Which is wider?"), gpt("The first.")]
    example = fmt(processor, "conversation", llava_row(conversation, ["a.png", "b.png"], images))
    assert example.image_sizes.tolist() == [[64, 48], [40, 80]]
    assert "First <image>, then <image>." in processor.tokenizer.decode(example.input_ids)


def test_overlong_conversation_drops_turns_or_is_skipped(processor, images):
    long = " ".join(["word"] * 400)
    conversation = [human("<image>\nShort?"), gpt("Short."), human(long), gpt("Long.")]
    row = llava_row(conversation, "a.png", images)
    example = fmt(processor, "conversation", row, max_length=120)
    assert example.truncated and example.length <= 120
    assert "Long." not in processor.tokenizer.decode(example.input_ids)
    assert reason_of(processor, "conversation", row, max_length=120, overlong="skip") == "too_long"
    first_too_long = llava_row([human("<image>\n" + long), gpt("A.")], "a.png", images)
    assert reason_of(processor, "conversation", first_too_long, max_length=120) == "too_long"


@settings(max_examples=25, deadline=None)
@given(max_length=st.integers(1, 160))
def test_pretraining_truncation_never_cuts_into_an_image(processor, max_length):
    import json

    row = Row(
        "docs.tar/d",
        json.loads(
            '{"texts": ["one two three four five six seven eight", null, "nine ten eleven twelve", null, "end"],'
            ' "images": [null, "0.png", null, "1.png", null]}'
        ),
        {"json": b"", "0.png": PNG, "1.png": PNG},
    )
    full = fmt(processor, "interleaved", row)
    try:
        example = fmt(processor, "interleaved", row, max_length=max_length)
    except BadSample as bad:
        assert bad.reason == SkipReason.TOO_LONG
        return
    assert example.length <= max_length
    assert example.truncated == (full.length > max_length)
    n = len(example.input_ids)
    assert example.input_ids.tolist() == full.input_ids[:n].tolist()  # a prefix of the whole document
    assert int((example.input_ids == processor.image_token_id).sum()) == example.num_images
    if example.num_images:
        assert torch.equal(example.pixel_values, full.pixel_values[: int(example.num_tiles.sum())])
    else:
        assert example.pixel_values is None


# ---------------------------------------------------------------------------------------------------
# Preference pairs


def test_preference_pair_labels_the_response_only(processor):
    pair = PreferencePair("p", (PNG,), "What is this?", "A red circle.", "A dog.")
    tokenized = tokenize_preference_pair(pair, processor)
    prompt = tokenized.prompt_input_ids.tolist()
    assert processor.tokenizer.decode(prompt).endswith("<|assistant|>\n")
    assert processor.tokenizer.decode(prompt).count(IMG) == 1  # §3.1: the image token is put in front
    for example, answer in ((tokenized.chosen, "A red circle."), (tokenized.rejected, "A dog.")):
        ids, labels = example.input_ids.tolist(), example.labels.tolist()
        assert ids[: len(prompt)] == prompt
        assert set(labels[: len(prompt)]) == {IGNORE_INDEX}
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert processor.tokenizer.decode(trained) == f"{answer}<|end|>\n"
    assert torch.equal(tokenized.chosen.pixel_values, tokenized.rejected.pixel_values)


def test_preference_multi_turn_prompt_masks_earlier_answers(processor):
    prompt = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Count?"},
    )
    tokenized = tokenize_preference_pair(PreferencePair("p", (), prompt, "Two.", "Three."), processor)
    trained = [t for t in tokenized.chosen.labels.tolist() if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == "Two.<|end|>\n"


def test_preference_pair_from_a_table_row(processor, images):
    row = Row(
        "prefs.jsonl#0",
        {"id": "1", "images": ["a.png"], "prompt": "<image>\nWhat?", "chosen": "A", "rejected": "B"},
        image_root=images,
    )
    tokenized = Formatter(processor, "preference")(row, random.Random(0))
    assert tokenized.chosen.image_sizes.tolist() == [[64, 48]]
    assert reason_of(processor, "preference", row, max_length=10) == "too_long"


# ---------------------------------------------------------------------------------------------------
# Every bad-sample kind raises its reason


def _doc(texts, images, **members):
    import json

    return tar_row("docs.tar/d", json=json.dumps({"texts": texts, "images": images}), **members)


BAD_ROWS = [
    ("caption", lambda root: tar_row(png=b"", txt="c"), "empty_image"),
    ("caption", lambda root: tar_row(png=bad_image("truncated", RNG), txt="c"), "corrupt_image"),
    ("caption", lambda root: tar_row(png=bad_image("not_an_image", RNG), txt="c"), "corrupt_image"),
    ("caption", lambda root: tar_row(png=bad_image("bad_header", RNG), txt="c"), "corrupt_image"),
    ("caption", lambda root: tar_row(png=bad_image("bomb", RNG), txt="c"), "image_too_large"),
    ("caption", lambda root: tar_row(png=PNG), "missing_field"),
    ("caption", lambda root: tar_row(txt="c"), "missing_image"),
    ("caption", lambda root: tar_row(png=PNG, txt=" "), "empty_text"),
    ("caption", lambda root: tar_row(png=PNG, jpg=PNG, txt="c"), "image_token_mismatch"),
    ("caption", lambda root: tar_row(png=PNG, txt="an <image> in it"), "image_token_mismatch"),
    ("caption", lambda root: tar_row(png=PNG, txt=b"\xff\xfe"), "invalid_field"),
    ("caption", lambda root: Row("t.jsonl#0", {"image": "nope.png", "caption": "c"}, image_root=root), "missing_image"),
    ("caption", lambda root: Row("t.jsonl#0", {"image": None, "caption": "c"}), "missing_image"),
    ("caption", lambda root: Row("t.jsonl#0", {"image": 3, "caption": "c"}), "invalid_field"),
    ("caption", lambda root: Row("t.jsonl#0", {"image": {"bytes": PNG}, "caption": ["c"]}), "invalid_field"),
    ("interleaved", lambda root: _doc(["a"], [None, "0.png"]), "invalid_field"),
    ("interleaved", lambda root: _doc(["a", None], [None, "0.png"]), "missing_image"),
    (
        "interleaved",
        lambda root: _doc(["a", None], [None, "0.png"], **{"0_png": PNG, "1_png": PNG}),
        "image_token_mismatch",
    ),
    ("interleaved", lambda root: _doc(["a", "b"], [None, "0.png"], **{"0_png": PNG}), "invalid_field"),
    ("interleaved", lambda root: _doc([None], ["0.png"], **{"0_png": PNG}), "empty_text"),
    (
        "interleaved",
        lambda root: _doc(
            ["a"] + [None] * 5, [None] + [f"{i}.png" for i in range(5)], **{f"{i}_png": PNG for i in range(5)}
        ),
        "too_many_images",
    ),
    ("interleaved", lambda root: tar_row(json='{"images": []}'), "missing_field"),
    ("interleaved", lambda root: tar_row(json='{"texts": "abc", "images": "abc"}'), "invalid_field"),
    ("ocr", lambda root: tar_row(png=PNG, json='{"ocr": [{"text": "A", "box": [0, 0, 1]}]}'), "invalid_field"),
    ("ocr", lambda root: tar_row(png=PNG, json='{"ocr": [{"text": "A", "box": [0, 0, 1.5, 1]}]}'), "invalid_field"),
    ("ocr", lambda root: tar_row(png=PNG, json='{"ocr": [{"box": [0, 0, 1, 1]}]}'), "invalid_field"),
    ("ocr", lambda root: tar_row(png=PNG, json="{}"), "missing_field"),
    ("ocr", lambda root: tar_row(png=PNG, json='{"ocr": []}'), "empty_text"),
    ("ocr", lambda root: Row("t#0", {"image": PNG, "ocr": "[{not json"}), "unreadable_json"),
    (
        "grounding",
        lambda root: tar_row(png=PNG, json='{"caption": "x", "objects": [{"phrase": "x"}]}'),
        "invalid_field",
    ),
    (
        "grounding",
        lambda root: tar_row(png=PNG, json='{"caption": "x", "objects": [{"phrase": "x", "box": [1, 0, 0, 1]}]}'),
        "invalid_field",
    ),
    ("grounding", lambda root: tar_row(png=PNG, json='{"objects": []}'), "missing_field"),
    ("conversation", lambda root: llava_row([human("Q")]), "invalid_conversation"),
    ("conversation", lambda root: llava_row([human("Q"), human("Q"), gpt("A")]), "invalid_conversation"),
    ("conversation", lambda root: llava_row([human(None), gpt("A")]), "invalid_conversation"),
    ("conversation", lambda root: llava_row([{"speaker": "x"}, gpt("A")]), "invalid_conversation"),
    ("conversation", lambda root: llava_row({"from": "human"}), "invalid_field"),
    ("conversation", lambda root: llava_row("[not JSON"), "unreadable_json"),  # tables may hold lists as JSON strings
    ("conversation", lambda root: Row("s#0", {"id": 1}), "missing_field"),
    ("conversation", lambda root: llava_row([human("<image>\nQ"), gpt("A")]), "image_token_without_image"),
    (
        "conversation",
        lambda root: llava_row([human("<image>"), gpt("A")], ["a.png", "b.png"], root),
        "image_token_mismatch",
    ),
    (
        "conversation",
        lambda root: llava_row([human("<image>\nQ"), gpt("A <image>")], "a.png", root),
        "image_token_mismatch",
    ),
    ("conversation", lambda root: llava_row([human("Q"), gpt("A")], ["a.png"] * 5, root), "too_many_images"),
    ("conversation", lambda root: llava_row([human("Q"), gpt("A")], "gone.png", root), "missing_image"),
    ("preference", lambda root: Row("p#0", {"prompt": "Q", "chosen": "A"}), "missing_field"),
    ("preference", lambda root: Row("p#0", {"prompt": "Q", "chosen": "A", "rejected": ""}), "empty_text"),
    ("preference", lambda root: Row("p#0", {"prompt": 3, "chosen": "A", "rejected": "B"}), "invalid_field"),
    (
        "preference",
        lambda root: Row("p#0", {"prompt": [{"role": "assistant", "content": "A"}], "chosen": "A", "rejected": "B"}),
        "invalid_conversation",
    ),
    (
        "preference",
        lambda root: Row("p#0", {"prompt": "<image> Q", "chosen": "A", "rejected": "B"}),
        "image_token_without_image",
    ),
]


@pytest.mark.parametrize(
    "format, make_row, reason", BAD_ROWS, ids=[f"{f}-{r}-{i}" for i, (f, _, r) in enumerate(BAD_ROWS)]
)
def test_bad_sample_raises_its_reason(processor, images, format, make_row, reason):
    assert reason_of(processor, format, make_row(images)) == reason


def test_parse_record_returns_typed_records():
    document = parse_record(_doc(["a", None], [None, "0.png"], **{"0_png": PNG}), "interleaved")
    assert isinstance(document, InterleavedDocument) and document.segments == ("a", PNG)
    with pytest.raises(ValueError, match="unknown format"):
        parse_record(tar_row(), "video")
