"""Tiny post-training data and models for tests, benchmarks and trial runs.

    base = write_base_checkpoint(root / "base", tiny_config(), processor)   # our checkpoint format
    jsonl = write_preference_pairs(root / "pairs", rng, images_per_prompt=(0, 1, 3))

Preference prompts hold 0, 1 or several images interleaved in the text; each pair's chosen answer
names the colours of its images, the rejected one gets them wrong, so a model that reads its images
can learn the preference and one that does not cannot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SIZES = ((60, 40), (30, 30), (90, 30), (40, 70))


def colour_image(rng: np.random.Generator, colour: str, size: tuple[int, int]) -> Image.Image:
    """A noisy image of one colour, (W, H) `size`."""
    width, height = size
    noise = rng.integers(-20, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8))


def pair_content(rng: np.random.Generator, num_images: int) -> tuple[list[Image.Image], str, str, str]:
    """(images, prompt, chosen, rejected) of one pair; `<image>`s interleaved in the prompt's text."""
    images, colours = [], []
    for _ in range(num_images):
        colour = str(rng.choice(list(COLOURS)))
        images.append(colour_image(rng, colour, SIZES[int(rng.integers(len(SIZES)))]))
        colours.append(colour)
    if num_images == 0:
        return [], "Say the name of a colour.", "It is red.", "It is a shape."
    places = ", then ".join("<image>" for _ in images)  # "Look at <image>, then <image>, then <image>. ..."
    wrong = [next(c for c in COLOURS if c != colour) for colour in colours]
    return (
        images,
        f"Look at {places}. What colour is each image?",
        "They are " + ", ".join(colours) + ".",
        "They are " + ", ".join(wrong) + ".",
    )


def preference_row(rng: np.random.Generator, key: str, num_images: int, image_dir: Path) -> dict:
    """One `{"id", "images", "prompt", "chosen", "rejected", "scores"}` row; its images written to `image_dir`."""
    images, prompt, chosen, rejected = pair_content(rng, num_images)
    names = []
    for index, image in enumerate(images):
        names.append(f"{key}-{index}.png")
        image.save(Path(image_dir) / names[-1])
    scores = {"chosen": 1.0, "rejected": 0.0}
    return {"id": key, "images": names, "prompt": prompt, "chosen": chosen, "rejected": rejected, "scores": scores}


def write_preference_pairs(
    root: Path, rng: np.random.Generator, num_pairs: int = 12, images_per_prompt: Sequence[int] = (0, 1, 3)
) -> Path:
    """`root/pairs.jsonl` (+ `root/images/`) with prompts of `images_per_prompt` images in turn."""
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = [
        preference_row(rng, f"pair{index:04d}", images_per_prompt[index % len(images_per_prompt)], images)
        for index in range(num_pairs)
    ]
    path = Path(root) / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preference_batch(processor, rng: np.random.Generator, images_per_prompt: Sequence[int] = (0, 1, 3)) -> dict:
    """A collated preference batch (`collate_preference`), one pair per entry of `images_per_prompt`."""
    from blip3.data.collate import collate_preference
    from blip3.data.formats import tokenize_preference_pair
    from blip3.data.records import PreferencePair

    examples = []
    for index, count in enumerate(images_per_prompt):
        images, prompt, chosen, rejected = pair_content(rng, count)
        pair = PreferencePair(f"pair{index}", tuple(images), prompt, chosen, rejected)
        examples.append(tokenize_preference_pair(pair, processor))
    return collate_preference(examples, processor.pad_token_id)


def preference_mixture(jsonl: Path, name: str = "pairs", image_root: Path | None = None) -> dict:
    """A one-source mixture (inline) over a preference JSONL (images in `image_root`, default `images/` beside it)."""
    return {
        "sources": [
            {
                "name": name,
                "type": "jsonl",
                "format": "preference",
                "path": str(jsonl),
                "image_root": str(image_root or Path(jsonl).parent / "images"),
            }
        ]
    }


def tiny_config(**overrides):
    """The `tiny` preset (whose processor it shares) with a slim token sampler: 2 layers of 2 heads × 8
    instead of the perceiver's default 6 × 16 × 96, which dominates a tiny model's time on a CPU."""
    from blip3.config import preset

    sampler = dict(input_dim=16, output_dim=16, num_latents=4, depth=2, heads=2, dim_head=8)
    return preset("tiny", sampler_config=sampler, **overrides)


def write_base_checkpoint(folder: Path, config, processor, seed: int = 0) -> Path:
    """A freshly initialised model of `config`, saved with its processor (a stand-in for an SFT checkpoint)."""
    from blip3.modeling.model import Blip3ForConditionalGeneration

    torch.manual_seed(seed)
    Blip3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
