"""Blip3Processor: batches, the image-count and length invariants, conversations, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from blip3 import IGNORE_INDEX, Blip3ImageProcessor, Blip3Processor
from blip3.config import preset
from conftest import TINY_FIXTURE, build_test_tokenizer, needs_tiny_fixture

IMAGE, PAD, END, ASSISTANT = 32012, 32011, 32007, 32001


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SMALL, WIDE, PHOTO = image(20, 20), image(90, 30, 1), image(640, 480, 2)  # 3, 4, 5 tiles: 12, 16, 20 tokens


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]


def test_vision_tokens_per_image(processor):
    assert [processor.vision_tokens_per_image(im.size) for im in (SMALL, WIDE, PHOTO)] == [12, 16, 20]
    config = preset("tiny")
    assert processor.vision_tokens_per_image((1400, 280)) == config.num_vision_tokens((1400, 280)) == 16


def test_a_batch_of_texts_with_images(processor):
    out = processor(["one <image> here", "two <image> and <image>, a longer text"], images=[[PHOTO], [SMALL, WIDE]])
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "num_images", "num_tiles"}
    assert (out["input_ids"] == IMAGE).sum(1).tolist() == [1, 2]  # one token per image; the model expands it
    assert out["num_images"].tolist() == [1, 2]
    assert out["num_tiles"].tolist() == [5, 3, 4]
    assert out["image_sizes"].tolist() == [[640, 480], [20, 20], [90, 30]]
    assert out["pixel_values"].shape == (12, 3, 28, 28)
    assert torch.equal(out["pixel_values"], processor.image_processor([PHOTO, SMALL, WIDE])["pixel_values"])
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64


def test_padding_sides(processor):
    texts = ["short", "a much longer text than the first"]
    right = processor(texts)
    left = processor(texts, padding_side="left")
    length = int(right["attention_mask"][0].sum())
    assert right["attention_mask"][0].tolist() == [1] * length + [0] * (right["input_ids"].shape[1] - length)
    assert left["attention_mask"][0].tolist() == right["attention_mask"][0].flip(0).tolist()
    assert (right["input_ids"][0, length:] == PAD).all() and (left["input_ids"][0, :-length] == PAD).all()
    assert right["input_ids"][0, :length].tolist() == left["input_ids"][0, -length:].tolist()
    assert "pixel_values" not in right  # text only


def test_image_count_must_match_the_image_tokens(processor):
    with pytest.raises(ValueError, match="sample 0 has 2 <image> tokens but 1 images"):
        processor("<image> and <image>", images=[SMALL])
    with pytest.raises(ValueError, match="sample 1 has 1 <image> tokens but 0 images"):
        processor(["<image>", "<image>"], images=[[SMALL], []])
    with pytest.raises(ValueError, match="sample 0 has 0 <image> tokens but 1 images"):
        processor.process_conversations(turns("no image", "ok"), [SMALL])
    with pytest.raises(ValueError, match=r"2 lists \(one per sample\), not one flat list"):
        processor(["<image>", "<image>"], images=[SMALL, SMALL])
    out = processor("<image> alone", images=SMALL)  # a single image for a single text is fine
    assert out["num_images"].tolist() == [1]


def spliced_length(processor, out, row=0) -> int:
    return (
        int(out["attention_mask"][row].sum())
        - int(out["num_images"][row])
        + sum(processor.vision_tokens_per_image(tuple(size)) for size in out["image_sizes"].tolist())
    )


def test_max_length_counts_the_spliced_length(processor):
    text = "look <image> then some words after the image"
    full = processor(text, images=[PHOTO])
    length = spliced_length(processor, full)
    assert length == full["input_ids"].shape[1] - 1 + 20
    assert torch.equal(processor(text, images=[PHOTO], max_length=length)["input_ids"], full["input_ids"])
    with pytest.raises(
        ValueError,
        match=rf"sample 0 is {length} positions long .* 1 <image>, 20 vision tokens.* max_length={length - 1}",
    ):
        processor(text, images=[PHOTO], max_length=length - 1)
    cut = processor(text, images=[PHOTO], max_length=length - 3, truncation="right")
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :-3])
    assert spliced_length(processor, cut) == length - 3


def test_truncation_never_cuts_into_an_image(processor):
    text = "a few words and then <image>"
    length = spliced_length(processor, processor(text, images=[PHOTO]))
    with pytest.raises(ValueError, match=rf"sample 0 is {length} positions .* would cut into image 0"):
        processor(text, images=[PHOTO], max_length=length - 1, truncation="right")
    with pytest.raises(ValueError, match="sample 1 .* would cut into image 1"):
        processor(["fits", "<image> b <image> c"], images=[[], [SMALL, PHOTO]], max_length=30, truncation="right")


def test_conversations_for_training(processor):
    conversation = turns("<image>\nWhat is it?", "A red circle.")
    out = processor.process_conversations([conversation, turns("Hi", "Hello there.")], images=[[PHOTO], []])
    assert out["labels"].shape == out["input_ids"].shape
    labelled = out["labels"][0][out["labels"][0] != IGNORE_INDEX].tolist()
    assert processor.decode(labelled) == "A red circle.<|end|>\n"
    assert (out["labels"][out["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (out["labels"][out["input_ids"] == IMAGE] == IGNORE_INDEX).all()
    assert out["attention_mask"][1, -1] == 0  # right padding for training
    assert out["num_images"].tolist() == [1, 0] and out["num_tiles"].tolist() == [5]


def test_conversations_for_generation(processor):
    out = processor.process_conversations(
        [turns("<image> What is it?"), turns("Hello", "Hi!", "Tell me more about it, please.")],
        images=[[SMALL], []],
        add_generation_prompt=True,
    )
    assert "labels" not in out
    assert out["input_ids"][:, -2:].tolist() == [[ASSISTANT, 13]] * 2  # both end with <|assistant|>\n
    assert out["attention_mask"][0, 0] == 0  # left padding for generation
    with pytest.raises(ValueError, match="cannot be truncated"):
        processor.process_conversations(turns("Q"), add_generation_prompt=True, max_length=8, truncation="right")


@needs_tiny_fixture
def test_the_official_prompt_layout(processor):
    # the fixture's prompts: <s><|user|>\n … <image> … <|end|>\n<|assistant|>\n with the official ids
    fixture = json.loads((TINY_FIXTURE / "inputs.json").read_text())
    reference = fixture["cases"][1]["forward"]["lang_x"][0]
    ours = processor.process_conversations(
        turns("<image>\nDescribe the image."), [WIDE], add_generation_prompt=True, system_prompt=None
    )["input_ids"][0].tolist()
    assert ours[:4] == reference[:4] == [1, 32010, 13, IMAGE]
    assert ours[-4:] == reference[-4:] == [END, 13, ASSISTANT, 13]


def test_drop_turns_keeps_whole_leading_exchanges(processor):
    exchanges = turns("<image> first?", "One.", "<image> second?", "Two.", "<image> third?", "Three.")
    images = [SMALL, WIDE, PHOTO]
    two = processor.process_conversations(exchanges[:4], images[:2])
    limit = spliced_length(processor, two)
    dropped = processor.process_conversations(exchanges, images, max_length=limit, truncation="drop_turns")
    for key in two:
        assert torch.equal(dropped[key], two[key]), key
    with pytest.raises(ValueError, match="sample 0 is .* over max_length=10"):
        processor.process_conversations(exchanges, images, max_length=10, truncation="drop_turns")


def test_decode_generated_stops_at_end(processor):
    tokenizer = processor.tokenizer
    answer = tokenizer("A red circle.", add_special_tokens=False)["input_ids"]
    generated = torch.tensor([answer + [END, 13, 500, 600], answer + [tokenizer.eos_token_id, 700, PAD, PAD]])
    assert processor.decode_generated(generated) == ["A red circle.", "A red circle."]
    assert processor.decode_generated([answer]) == ["A red circle."]


def test_from_config_checks_the_token_ids():
    with pytest.raises(ValueError, match="differ from the model config"):
        Blip3Processor.from_config(preset("tiny"), build_test_tokenizer(phi3_layout=False))
    with pytest.raises(ValueError, match="add_xgenmm_special_tokens"):
        Blip3Processor(Blip3ImageProcessor(image_size=28), build_test_tokenizer(), num_latents=4)


def test_save_and_load_with_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Blip3Processor and type(loaded.image_processor) is Blip3ImageProcessor
    assert loaded.num_latents == 4 and loaded.image_processor.image_size == 28
    assert (loaded.image_token_id, loaded.pad_token_id, loaded.end_token_id) == (IMAGE, PAD, END)
    conversation = turns("<image> What is it?", "A circle.")
    expected = processor.process_conversations(conversation, [PHOTO])
    actual = loaded.process_conversations(conversation, [PHOTO])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
