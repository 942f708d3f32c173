"""`blip3 demo`: the inference path end to end on a tiny model, offline, in seconds.

It builds what a user of the released checkpoints touches, at toy size: a tokenizer with Phi-3's id
layout, a model and processor from the `tiny` preset, a checkpoint written in the *official*
xGen-MM layout and read back without remote code, then any-res planning and a streamed, batched
multi-image generation. The weights are untrained, so the words are noise; what it shows is the
plumbing, checked as it goes (exact round trip, batched = one by one).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from transformers import TextStreamer

from blip3.factory import create, load_pretrained
from blip3.interop.xgenmm import save_official
from blip3.processing.tokenizer import build_tokenizer

CORPUS = [
    "a red circle above a blue square",
    "two green triangles on a white background",
    "what colour is the circle? it is red.",
    "how many shapes are there in the second image?",
    "the text in the image says hello",
]


def draw_scene(size: tuple[int, int], shapes: list[tuple[str, str, tuple[int, int, int, int]]]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for kind, colour, box in shapes:
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    return image


def run(out_dir: Path) -> None:
    console = Console()
    start = time.perf_counter()
    torch.manual_seed(0)

    console.rule("[bold]1. tokenizer, model and processor (preset 'tiny')")
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=400, phi3_layout=True)
    model, processor = create("tiny", tokenizer)
    console.print(f"special ids: <pad> {processor.pad_token_id}, <image> {processor.image_token_id} (Phi-3 layout)")
    console.print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    console.rule("[bold]2. official xGen-MM layout, written and read back without remote code")
    official = out_dir / "official"
    save_official(model, official)
    processor.tokenizer.save_pretrained(official)
    loaded, processor = load_pretrained(official)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    console.print(f"{official}: {sorted(p.name for p in official.iterdir())}")
    console.print(f"every tensor identical after the round trip: [bold]{same}[/]")
    assert same
    model = loaded.eval()

    console.rule("[bold]3. any-res plans")
    images = [
        draw_scene((640, 480), [("circle", "red", (60, 60, 260, 260)), ("square", "blue", (360, 200, 560, 400))]),
        draw_scene(
            (1400, 280), [("square", "green", (100, 40, 300, 240)), ("circle", "orange", (1000, 40, 1200, 240))]
        ),
        draw_scene((22, 22), [("circle", "purple", (4, 4, 18, 18))]),
    ]
    for image in images:
        cols, rows = model.config.image_grid(image.size)
        console.print(
            f"image {image.size[0]}×{image.size[1]}: grid {cols}×{rows}, {model.config.num_tiles(image.size)} tiles, "
            f"{model.config.num_vision_tokens(image.size)} vision tokens"
        )

    console.rule("[bold]4. streamed multi-image generation (untrained weights: expect noise)")
    conversations = [
        [{"role": "user", "content": "Look at <image> and <image>. How many shapes are in the second image?"}],
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
    ]
    per_sample = [images[:2], images[2:]]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    inputs = processor.process_conversations(conversations[:1], per_sample[:1], add_generation_prompt=True)
    console.print("answer: ", end="")
    model.generate(**inputs, streamer=TextStreamer(processor.tokenizer, skip_prompt=True), **kwargs)

    batch = processor.process_conversations(conversations, per_sample, add_generation_prompt=True)
    together = model.generate(**batch, **kwargs).tolist()
    alone = [
        model.generate(**processor.process_conversations([c], [i], add_generation_prompt=True), **kwargs)[0].tolist()
        for c, i in zip(conversations, per_sample)
    ]
    console.print(f"batched generation equals one-by-one: [bold]{together == alone}[/]")
    assert together == alone
    console.rule(f"[bold green]done in {time.perf_counter() - start:.1f} s")
