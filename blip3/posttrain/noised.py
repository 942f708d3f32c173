"""Noised-image negatives: the model's own answer when it cannot see the image, as an extra rejected answer.

The paper's second DPO pass (REFERENCE §4.1) adds, for each preference prompt, a dispreferred response
that the model itself wrote on a noised copy of the image. With the image destroyed the model answers
from its language prior — the answer a hallucinating model gives — and DPO then prefers the grounded
answer to it.

Noise. The forward process of a diffusion model (DDPM, Ho et al. 2020: T = 1000 steps, linear β from
1e-4 to 0.02) at step t, on pixels scaled to [−1, 1]:

    x_t = √ᾱ_t · x + √(1 − ᾱ_t) · ε,   ε ~ N(0, I),   ᾱ_t = Π_{s ≤ t} (1 − β_s)

then clipped back to 8-bit pixels. The default t = 500 keeps √ᾱ ≈ 0.28 of the signal, the setting VCD
(Leng et al. 2023) uses to make a model fall back on its prior; t = 1000 leaves almost pure noise. The
noise of each image is drawn from a generator seeded by (seed, row id, image index), so a row's negative
does not depend on the batch it was generated in.

Rows. For each input row (`{"id", "images", "prompt", "chosen", "rejected", ...}`), the prompt is asked
with its images noised (greedy decoding); the answer becomes the `rejected` of a new row
`<id>-noised` with the same prompt, the same clean images and the same chosen answer, plus
`"negative": {"kind": "noised-image", "noise_step": t, "seed": s}` and `"source_id"`. The original rows
are written first (unless `only_new`). A new row is checked with the training tokenizer before it is
written; a text-only prompt (nothing to noise), an empty answer, an answer equal to the chosen one, or
one that does not tokenise as a valid pair is skipped and counted by reason.

Closed questions. On a yes / no question the prior is one answer (a model that cannot see says "no",
say), so the noised negatives of such prompts all point one way and teach the opposite bias, not
looking: on the demo world, whose pairs were a third existence questions then, a second pass over them
took the DPO model's hallucination rate from 43 to 100 % (docs/demo-findings.md). The paper's data
(VLFeedback) asks open questions; `min_chosen_words` keeps the pass to those (skipped rows are
counted as `short_chosen`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from blip3.data.collate import collate
from blip3.data.formats import Example, load_record_image, tokenize_preference_pair
from blip3.data.mixture import stable_seed
from blip3.data.records import BadSample, PreferencePair, Row, parse_record
from blip3.processing.chat import XGENMM_SYSTEM_PROMPT
from blip3.processing.processor import Blip3Processor

DDPM_STEPS = 1000
DDPM_BETAS = (1e-4, 0.02)


def alpha_bar(step: int, num_steps: int = DDPM_STEPS, betas: tuple[float, float] = DDPM_BETAS) -> float:
    """ᾱ_t of DDPM's linear schedule: the share of the signal's variance left after `step` steps."""
    if not 0 <= step <= num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps}], got {step}")
    schedule = np.linspace(betas[0], betas[1], num_steps, dtype=np.float64)
    return float(np.prod(1.0 - schedule[:step]))


def noise_image(image: Image.Image, step: int, rng: np.random.Generator) -> Image.Image:
    """`image` after `step` steps of the diffusion forward process (same size, RGB)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
    keep = alpha_bar(step)
    noised = np.sqrt(keep) * pixels + np.sqrt(1.0 - keep) * rng.standard_normal(pixels.shape)
    return Image.fromarray(np.clip((noised + 1.0) * 127.5, 0, 255).round().astype(np.uint8))


@dataclass
class NoisedSettings:
    noise_step: int = 500
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 128
    system_prompt: str | None = XGENMM_SYSTEM_PROMPT  # as the preference format's default
    max_images: int | None = None
    min_chosen_words: int = 0  # skip prompts whose chosen answer is shorter (closed questions); 0: none


@dataclass
class NoisedCounts:
    rows: int = 0  # input rows read
    written: int = 0  # new rows written
    skipped: Counter = field(default_factory=Counter)  # reason -> rows without a new negative

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "written": self.written, "skipped": dict(self.skipped)}


class _Skip(Exception):
    """A row that gets no noised-image negative, for `reason`: a text-only prompt (`no_image`, nothing
    to noise) or a closed question (`short_chosen`, see `min_chosen_words`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Prepared:
    raw: dict[str, Any]
    pair: PreferencePair
    clean: list[Image.Image]
    prompt: Example  # the prompt alone, with the noised images


def _prepare(
    raw: dict[str, Any], index: int, image_root: Path | None, processor: Blip3Processor, settings: NoisedSettings
) -> _Prepared:
    key = str(raw.get("id", f"row{index}"))
    pair = parse_record(Row(key, raw, image_root=image_root), "preference")
    if not pair.images:
        raise _Skip("no_image")
    if len(pair.chosen.split()) < settings.min_chosen_words:  # before any image is loaded
        raise _Skip("short_chosen")
    max_pixels = processor.image_processor.max_image_pixels
    clean = [load_record_image(image, key, max_pixels) for image in pair.images]
    noised = [
        noise_image(image, settings.noise_step, np.random.default_rng(stable_seed(settings.seed, key, k)))
        for k, image in enumerate(clean)
    ]
    example = tokenize_preference_pair(
        dataclasses.replace(pair, images=tuple(noised)),
        processor,
        max_images=settings.max_images,
        system_prompt=settings.system_prompt,
    )
    prompt_ids = example.prompt_input_ids
    chosen = example.chosen
    prompt = Example(
        key,
        prompt_ids,
        torch.full_like(prompt_ids, -100),
        chosen.pixel_values,
        chosen.image_sizes,
        chosen.num_tiles,
        chosen.length - (len(chosen.input_ids) - len(prompt_ids)),
    )
    return _Prepared(raw, pair, clean, prompt)


@torch.no_grad()
def generate_answers(model, processor: Blip3Processor, prompts: Sequence[Example], max_new_tokens: int) -> list[str]:
    """Greedy answers to prompt-only examples (one batch)."""
    batch = collate(prompts, processor.pad_token_id)
    device = next(model.parameters()).device
    inputs = {
        name: batch[name].to(device)
        for name in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "num_tiles", "num_images")
        if name in batch
    }
    new_tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [text.strip() for text in processor.decode_generated(new_tokens)]


def noised_negative_rows(
    model,
    processor: Blip3Processor,
    rows: Iterable[dict[str, Any]],
    image_root: str | Path | None,
    settings: NoisedSettings | None = None,
    counts: NoisedCounts | None = None,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """For each usable row, the new row whose rejected answer the model gave on noised images."""
    settings = settings or NoisedSettings()
    counts = counts if counts is not None else NoisedCounts()
    root = Path(image_root) if image_root is not None else None
    model.eval()
    pending: list[_Prepared] = []

    def flush() -> Iterator[dict[str, Any]]:
        answers = generate_answers(model, processor, [p.prompt for p in pending], settings.max_new_tokens)
        for prepared, answer in zip(pending, answers):
            row = _new_row(prepared, answer, processor, settings, counts)
            if row is not None:
                counts.written += 1
                yield row
        pending.clear()

    for index, raw in enumerate(tqdm(rows, desc="noised negatives", unit="row", disable=not progress)):
        counts.rows += 1
        try:
            pending.append(_prepare(raw, index, root, processor, settings))
        except BadSample as bad:
            counts.skipped[bad.reason.value] += 1
            continue
        except _Skip as skip:
            counts.skipped[skip.reason] += 1
            continue
        if len(pending) == settings.batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _new_row(prepared: _Prepared, answer: str, processor, settings: NoisedSettings, counts: NoisedCounts):
    raw, pair = prepared.raw, prepared.pair
    if not answer:
        counts.skipped["empty_answer"] += 1
        return None
    if answer == pair.chosen.strip():
        counts.skipped["same_as_chosen"] += 1
        return None
    try:  # the new pair must be one the training formatter accepts
        tokenize_preference_pair(
            dataclasses.replace(pair, images=tuple(prepared.clean), rejected=answer),
            processor,
            max_images=settings.max_images,
            system_prompt=settings.system_prompt,
        )
    except BadSample as bad:
        counts.skipped[f"invalid_{bad.reason.value}"] += 1
        return None
    return {
        "id": f"{pair.key}-noised",
        "images": raw.get("images", raw.get("image", [])),
        "prompt": raw["prompt"],
        "chosen": raw["chosen"],
        "rejected": answer,
        "negative": {"kind": "noised-image", "noise_step": settings.noise_step, "seed": settings.seed},
        "source_id": pair.key,
    }


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON: {err}") from None


def write_noised_negatives(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    image_root: str | Path | None = None,
    settings: NoisedSettings | None = None,
    only_new: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> NoisedCounts:
    """Read a preference JSONL, write it again (unless `only_new`) followed by the noised-negative rows.

    `checkpoint` is a model folder or an adapter folder (its base + adapter, merged for speed); images
    are found under `image_root` (default: the input file's folder), and the output names them as the
    input does, so it is read with the same `image_root`.
    """
    from blip3.factory import load_pretrained
    from blip3.training.lora import is_adapter_folder, load_adapted, merge_and_unload

    if is_adapter_folder(checkpoint):
        model, processor = load_adapted(checkpoint)
        merge_and_unload(model)
    else:
        model, processor = load_pretrained(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    image_root = Path(image_root) if image_root is not None else Path(input_path).parent
    counts = NoisedCounts()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(output_path.name + ".tmp")
    with open(temporary, "w") as out:
        if not only_new:
            for raw in read_jsonl(input_path):
                out.write(json.dumps(raw) + "\n")
        rows = read_jsonl(input_path)
        for row in noised_negative_rows(model, processor, rows, image_root, settings, counts, progress):
            out.write(json.dumps(row) + "\n")
    temporary.rename(output_path)  # the file exists only once it is complete
    return counts
