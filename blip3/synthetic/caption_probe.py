"""The caption probe: which words of the world's reference captions a model predicts from the image.

A pre-trained model answers no questions, so generating with it says little about what it has
learned to see. Teacher forcing says more: the model reads `<image>caption<|endofchunk|>`, as in
pre-training, and at every word of interest we check whether its most likely next token is the
caption's. A word counts as right when all its tokens are.

    colour             "red" in "a red star"
    shape/seen         "star" after a colour, the pair seen in training questions
    shape/held-out     "star" after "red" when (red, star) is one of the world's held-out pairs
    text               the letters of a quoted word: "NEXT" in 'the small text "NEXT"'

Each shape word follows its colour word, so it measures whether the model binds the two in the
image; the held-out pairs show whether it reads shapes apart from colours. The demo's pre-training
length was set with it (docs/demo-findings.md: "Pre-training was stopped too early"):

    blip3 probe-captions runs/demo/stages/pretrain --world runs/demo/world
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blip3.data.formats import caption_text
from blip3.processing.image import load_image
from blip3.processing.processor import Blip3Processor
from blip3.synthetic.world import COLOURS, SHAPES

CATEGORIES = ("colour", "shape/seen", "shape/held-out", "text")
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_QUOTED = re.compile(r'"([^"]+)"')


@dataclass
class ProbeResult:
    right: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    captions: int = 0

    def accuracy(self, category: str) -> float | None:
        """Percent right, or None where the captions held no such word."""
        return 100.0 * self.right[category] / self.total[category] if self.total[category] else None

    def to_dict(self) -> dict:
        return {
            "captions": self.captions,
            **{c: {"accuracy": self.accuracy(c), "n": self.total[c]} for c in CATEGORIES},
        }


def caption_words(caption: str, held_out: Iterable[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """(category, start, end) character spans of the probed words in `caption`."""
    held_out = {tuple(pair) for pair in held_out}
    words = []
    for match in _OBJECT.finditer(caption):
        colour, shape = match.group(1), match.group(2)
        words.append(("colour", match.start(1), match.end(1)))
        category = "shape/held-out" if (colour, shape) in held_out else "shape/seen"
        words.append((category, match.start(2), match.end(2)))
    words += [("text", m.start(1), m.end(1)) for m in _QUOTED.finditer(caption)]
    return sorted(words, key=lambda word: word[1])


@torch.no_grad()
def probe_captions(
    model: torch.nn.Module,
    processor: Blip3Processor,
    samples: Iterable[tuple[object, str]],
    held_out: Iterable[tuple[str, str]] = (),
    progress: bool = True,
) -> ProbeResult:
    """Teacher-forced accuracy on the probed words of each (image, caption) sample.

    The text is `caption_text(caption)`: one `<image>` and then the caption, so every caption token sits
    at the same offset in the spliced sequence (the image's vision tokens replace the one `<image>` id).
    """
    tokenizer = processor.tokenizer
    held_out = list(held_out)
    result = ProbeResult()
    model.eval()
    device = next(model.parameters()).device
    for image, caption in tqdm(list(samples), desc="caption probe", unit="caption", disable=not progress):
        caption = caption.strip()
        text = caption_text(caption)
        prefix = text.index(caption)  # the characters of `<image>` before it
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        inputs = processor(text, [load_image(image)])
        if inputs["input_ids"][0].tolist() != ids:
            raise ValueError("the processor and its tokenizer disagree on the caption's tokens")
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        logits = model(**inputs).logits[0]
        # Position p of the text is position p + shift of the spliced sequence, for every token after the
        # image; the prediction of token p is read at the position before it.
        shift = logits.shape[0] - len(ids)
        predicted = logits.argmax(-1).tolist()
        result.captions += 1
        for category, start, end in caption_words(caption, held_out):
            span = [p for p, (a, b) in enumerate(offsets) if b > a and a < prefix + end and b > prefix + start]
            if not span:  # all() of nothing would count the word as right
                raise ValueError(f"no token of the caption covers {caption[start:end]!r}: {caption!r}")
            result.total[category] += 1
            result.right[category] += all(predicted[p - 1 + shift] == ids[p] for p in span)
    return result


def world_test_captions(world: str | Path, limit: int | None = None) -> tuple[list[tuple[Path, str]], list]:
    """The world's test-split reference captions as (image path, caption), and its held-out pairs."""
    world = Path(world)
    manifest = json.loads((world / "manifest.json").read_text())
    entries = json.loads((world / "eval" / "test" / "single.json").read_text())
    images = world / manifest.get("image_root", "images")
    samples = [(images / e["image"], e["answer"]) for e in entries if e["task"] == "caption"]
    return samples[:limit] if limit is not None else samples, [tuple(p) for p in manifest["held_out_pairs"]]
