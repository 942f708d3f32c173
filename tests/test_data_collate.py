"""Collation: ragged images and tiles, right padding, labels, target counts, slicing, length grouping."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.config import IGNORE_INDEX
from blip3.data.collate import collate, group_by_length, model_inputs, slice_batch, split_batch
from blip3.data.formats import Example, Formatter
from blip3.data.records import Row
from blip3.data.testing import png_bytes

PAD, IMAGE = 32011, 32012


@st.composite
def examples(draw, max_examples: int = 6) -> list[Example]:
    """Random examples: 1-12 tokens, 0-3 images of 1-5 tiles each, random supervised positions."""
    result = []
    for index in range(draw(st.integers(1, max_examples))):
        num_images = draw(st.integers(0, 3))
        text = draw(st.lists(st.integers(0, 31999), min_size=1, max_size=12))
        slots = sorted(draw(st.lists(st.integers(0, len(text)), min_size=num_images, max_size=num_images)))
        ids = list(text)
        for offset, slot in enumerate(slots):
            ids.insert(slot + offset, IMAGE)
        trained = draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))
        labels = [t if keep and t != IMAGE else IGNORE_INDEX for t, keep in zip(ids, trained)]
        tiles = draw(st.lists(st.integers(1, 5), min_size=num_images, max_size=num_images))
        result.append(
            Example(
                key=f"src:{index}",
                input_ids=torch.tensor(ids),
                labels=torch.tensor(labels),
                pixel_values=torch.randn(sum(tiles), 3, 2, 2) if num_images else None,
                image_sizes=torch.tensor([[10 + i, 20 + i] for i in range(num_images)], dtype=torch.int64).view(-1, 2),
                num_tiles=torch.tensor(tiles, dtype=torch.int64),
                length=len(ids) + sum(tiles),
            )
        )
    return result


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name


@settings(max_examples=60, deadline=None)
@given(examples())
def test_collate_pads_right_and_keeps_images_ragged(batch_examples):
    batch = collate(batch_examples, PAD)
    width = max(len(e.input_ids) for e in batch_examples)
    assert (
        batch["input_ids"].shape
        == batch["labels"].shape
        == batch["attention_mask"].shape
        == (len(batch_examples), width)
    )
    for row, example in enumerate(batch_examples):
        n = len(example.input_ids)
        assert torch.equal(batch["input_ids"][row, :n], example.input_ids)
        assert torch.equal(batch["labels"][row, :n], example.labels)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["input_ids"][row, n:].tolist()) <= {PAD}
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
    with_images = [e for e in batch_examples if e.num_images]
    if not with_images:
        assert "pixel_values" not in batch and "num_images" not in batch
    else:
        assert batch["num_images"].tolist() == [e.num_images for e in batch_examples]
        assert torch.equal(batch["pixel_values"], torch.cat([e.pixel_values for e in with_images]))
        assert batch["num_tiles"].sum() == len(batch["pixel_values"])
        assert len(batch["image_sizes"]) == len(batch["num_tiles"]) == batch["num_images"].sum()
        # each sample's <image> count equals its number of images: nothing is misaligned
        assert (batch["input_ids"] == IMAGE).sum(dim=1).tolist() == batch["num_images"].tolist()
    assert int(batch["num_target_tokens"]) == sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in batch_examples)
    assert batch["sample_keys"] == [e.key for e in batch_examples]


@settings(max_examples=60, deadline=None)
@given(examples(), st.data())
def test_slice_batch_equals_collating_the_slice(batch_examples, data):
    start = data.draw(st.integers(0, len(batch_examples) - 1))
    stop = data.draw(st.integers(start + 1, len(batch_examples)))
    batch = collate(batch_examples, PAD)
    assert_batches_equal(slice_batch(batch, start, stop), collate(batch_examples[start:stop], PAD))
    parts = split_batch(batch, data.draw(st.integers(1, len(batch_examples))))
    assert [key for part in parts for key in part["sample_keys"]] == batch["sample_keys"]
    assert sum(int(part["num_target_tokens"]) for part in parts) == int(batch["num_target_tokens"])


@settings(max_examples=40, deadline=None)
@given(examples(max_examples=12), st.integers(1, 4), st.integers(0, 100))
def test_group_by_length_keeps_every_example_once_in_sorted_runs(batch_examples, batch_size, seed):
    batches = group_by_length(batch_examples, batch_size, np.random.default_rng(seed))
    assert sorted(e.key for b in batches for e in b) == sorted(e.key for e in batch_examples)
    assert all(1 <= len(b) <= batch_size for b in batches)
    runs = sorted(batches, key=lambda b: (-b[0].length, -b[-1].length))  # longest first; ties by their shortest
    lengths = [e.length for b in runs for e in b]
    assert lengths == sorted(lengths, reverse=True)  # batches are contiguous runs of the sorted order


def _caption_examples(processor, sizes):
    formatter = Formatter(processor, "caption")
    rng = np.random.default_rng(0)
    return [
        formatter(
            Row(f"s/{i}", {}, {"png": png_bytes(rng, size), "txt": (f"caption number {i} " * (i + 1)).encode()}),
            random.Random(0),
        )
        for i, size in enumerate(sizes)
    ]


def test_collate_equals_the_processors_own_batch(processor):
    """The collated batch is exactly what the processor gives for the same samples together."""
    sizes = [(64, 48), (30, 90), (28, 28)]
    batch_examples = _caption_examples(processor, sizes)
    texts = [
        processor.tokenizer.decode(e.input_ids, skip_special_tokens=False).removeprefix("<s>") for e in batch_examples
    ]
    rng = np.random.default_rng(0)
    images = [[png_bytes(rng, size)] for size in sizes]
    expected = processor(texts, images)
    batch = collate(batch_examples, processor.pad_token_id)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "num_tiles", "num_images"):
        assert torch.equal(batch[name], expected[name]), name


def test_model_consumes_a_batch_and_counts_the_same_targets(processor):
    from blip3 import Blip3ForConditionalGeneration, preset

    torch.manual_seed(0)
    model = Blip3ForConditionalGeneration(preset("tiny")).train()
    batch = collate(_caption_examples(processor, [(64, 48), (30, 90)]), processor.pad_token_id)
    mean_loss = model(**model_inputs(batch)).loss  # averaged over the targets the model counts itself
    summed = model(**model_inputs(batch), num_items_in_batch=1).loss
    assert torch.allclose(summed / batch["num_target_tokens"], mean_loss, rtol=1e-5)


def test_collate_rejects_an_empty_list():
    with pytest.raises(ValueError):
        collate([], PAD)
