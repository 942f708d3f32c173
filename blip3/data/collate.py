"""Collation: examples -> one batch of exactly the model's inputs, plus what a trainer needs to know.

A batch (a dict) holds

    input_ids, attention_mask, labels [B, T]   right-padded: pad id, 0, -100
    pixel_values [ΣNp, 3, S, S]                every tile of every image, sample by sample, in <image> order
    image_sizes [N, 2] (W, H), num_tiles [N]   per image; N = all images of the batch
    num_images [B]                             per sample
    num_target_tokens                          0-d int64: supervised next-token targets (labels[:, 1:] != -100),
                                               the normaliser for gradient accumulation across micro-batches
    sample_keys                                list of "<source>:<row key>", for tracing a batch to its data

The four image entries are absent when no sample of the batch has an image. `model_inputs(batch)`
keeps only what `model(**...)` takes. `slice_batch` cuts a batch into micro-batches (or a rank's share)
that equal the collation of those samples alone.

Images and tiles are ragged per sample, so they are flat tensors with counts rather than padded
tensors: no compute is spent on padding tiles. Sequence packing (several samples per row with
attention and position resets) is not done here: the model's splice computes positions per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from blip3.config import IGNORE_INDEX
from blip3.data.formats import Example, PreferenceExample

MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "num_tiles", "num_images")
_IMAGE_INPUTS = ("pixel_values", "image_sizes", "num_tiles", "num_images")


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """One right-padded batch of `examples` (see the module docstring for its entries)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = example.input_ids
        attention_mask[row, :length] = 1
        labels[row, :length] = example.labels
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with_images = [example for example in examples if example.num_images]
    if with_images:
        batch["pixel_values"] = torch.cat([example.pixel_values for example in with_images])
        batch["image_sizes"] = torch.cat([example.image_sizes for example in examples])
        batch["num_tiles"] = torch.cat([example.num_tiles for example in examples])
        batch["num_images"] = torch.tensor([example.num_images for example in examples], dtype=torch.int64)
    batch["num_target_tokens"] = count_targets(labels)
    batch["sample_keys"] = [example.key for example in examples]
    return batch


def collate_preference(examples: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, Any]:
    """A batch of preference pairs: `chosen` and `rejected` are each a `collate` batch (row i of both is pair i)."""
    return {
        "chosen": collate([example.chosen for example in examples], pad_token_id),
        "rejected": collate([example.rejected for example in examples], pad_token_id),
        "prompt_lengths": torch.tensor([len(example.prompt_input_ids) for example in examples], dtype=torch.int64),
        "sample_keys": [example.key for example in examples],
    }


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Supervised next-token targets, as the model's loss counts them (the first position is never one)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a batch that `model(**...)` takes."""
    return {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}


def slice_batch(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Samples [start, stop) of a batch, equal to collating those samples alone (padding trimmed)."""
    rows = slice(start, stop)
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    part: dict[str, Any] = {name: batch[name][rows, :width] for name in ("input_ids", "attention_mask", "labels")}
    if "num_images" in batch:
        num_images = batch["num_images"]
        first_image, images = int(num_images[:start].sum()), int(num_images[rows].sum())
        if images:
            num_tiles = batch["num_tiles"]
            first_tile = int(num_tiles[:first_image].sum())
            tiles = int(num_tiles[first_image : first_image + images].sum())
            part["pixel_values"] = batch["pixel_values"][first_tile : first_tile + tiles]
            part["image_sizes"] = batch["image_sizes"][first_image : first_image + images]
            part["num_tiles"] = num_tiles[first_image : first_image + images]
            part["num_images"] = num_images[rows]
    part["num_target_tokens"] = count_targets(part["labels"])
    if "sample_keys" in batch:
        part["sample_keys"] = list(batch["sample_keys"][rows])
    return part


def split_batch(batch: Mapping[str, Any], num_parts: int) -> list[dict[str, Any]]:
    """A batch cut into `num_parts` consecutive slices of near-equal size (micro-batches, or ranks' shares)."""
    size = len(batch["input_ids"])
    if not 1 <= num_parts <= size:
        raise ValueError(f"cannot split a batch of {size} samples into {num_parts} parts")
    bounds = np.linspace(0, size, num_parts + 1).round().astype(int)
    return [slice_batch(batch, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def group_by_length(
    examples: Sequence[Example | PreferenceExample], batch_size: int, rng: np.random.Generator
) -> list[list[Example | PreferenceExample]]:
    """Batches of similar spliced length: the examples sorted longest first, cut into batches, the
    batches shuffled (so long and short batches alternate rather than the run starting with the
    longest). Less padding per batch; the order within a group of batches is all it changes."""
    ordered = sorted(examples, key=lambda example: -example.length)  # stable: equal lengths keep their order
    batches = [list(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
