"""Data pipeline throughput: samples/s of `blip3.data.build_loader` with 0, 1 and 2 DataLoader workers.

The setting matches the training step of `core.py` (b), which the loader must keep fed: the `small`
preset (112-px tiles, 32 latents per tile), batches of 4 samples, each one 640×480-class image (any-res:
a global view + tiles) and ~256 text tokens. Two kinds of data, written once into a temporary folder:

    caption      webdataset tar shards of JPEG images + captions (the pre-training path)
    conversation a LLaVA JSON list + an image folder, 1-2 images per sample (the SFT path)

Each measurement runs in its own subprocess (a fresh process per worker count, as a training run
would start); it times `--batches` batches after `--warmup` batches (worker start-up is reported
separately) and the median of `--rounds` rounds is reported.

    python benchmarks/data.py                    # writes benchmarks/results/data.json
    python benchmarks/data.py --batches 20 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 4
SIZES = [(640, 480), (800, 600), (480, 640), (1024, 768), (500, 375)]
CAPTION_WORDS = 250  # ~256 text tokens per sample with the benchmark tokenizer
WORKER_COUNTS = (0, 1, 2)
STREAMS_PER_RANK = 2  # fixed, so that 0, 1 and 2 workers read the very same batches


def write_data(root: Path, samples: int) -> dict[str, dict]:
    """Caption shards and a LLaVA folder with `samples` samples each; returns a mixture per kind."""
    import numpy as np

    from blip3.data.testing import encode_image, random_image, sentence, write_caption_shards, write_json

    write_caption_shards(
        root / "captions", 4, samples // 4, image_size=SIZES, caption_words=CAPTION_WORDS, image_format="JPEG"
    )
    rng = np.random.default_rng(1)
    images = root / "llava" / "images"
    images.mkdir(parents=True)
    records = []
    for index in range(samples):
        names = [f"{index}-{k}.jpg" for k in range(1 + index % 2)]
        for k, name in enumerate(names):
            (images / name).write_bytes(encode_image(random_image(rng, SIZES[(index + k) % len(SIZES)]), "JPEG"))
        question = " ".join(["<image>"] * len(names)) + " " + sentence(rng, 20)
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, CAPTION_WORDS - 20)}]
        records.append({"id": str(index), "image": names, "conversations": turns})
    write_json(root / "llava" / "data.json", records)
    return {
        "caption": {
            "sources": [{"name": "c", "type": "webdataset", "path": str(root / "captions"), "format": "caption"}]
        },
        "conversation": {
            "sources": [
                {
                    "name": "s",
                    "type": "llava",
                    "path": str(root / "llava" / "data.json"),
                    "format": "conversation",
                    "image_root": str(images),
                }
            ]
        },
    }


def small_processor():
    from blip3 import Blip3Processor, build_tokenizer, preset
    from blip3.data.testing import WORDS

    tokenizer = build_tokenizer([" ".join(WORDS)] * 8, vocab_size=400, phi3_layout=True)
    return Blip3Processor.from_config(preset("small"), tokenizer)


def measure(mixture: dict, workers: int, warmup: int, batches: int) -> dict:
    import torch

    from blip3.data import build_loader

    torch.set_num_threads(2)
    processor = small_processor()
    loader = build_loader(
        mixture,
        processor,
        batch_size=BATCH,
        seed=0,
        num_workers=workers,
        streams_per_rank=STREAMS_PER_RANK,
        max_length=4096,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    tokens = tiles = 0
    for _ in range(batches):
        batch = next(iterator)
        tokens += int(batch["attention_mask"].sum())
        tiles += int(batch["num_tiles"].sum())
    elapsed = time.perf_counter() - start
    loader.close()
    return {
        "workers": workers,
        "samples_per_s": batches * BATCH / elapsed,
        "batches_per_s": batches / elapsed,
        "startup_s": startup,
        "text_tokens_per_sample": tokens / (batches * BATCH),
        "tiles_per_sample": tiles / (batches * BATCH),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    args = parser.parse_args()
    if args.worker:
        mixture, workers = json.loads(args.worker)
        print(json.dumps(measure(mixture, workers, args.warmup, args.batches)))
        return

    samples = (args.warmup + args.batches) * BATCH + 64
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as folder:
        mixtures = write_data(Path(folder), samples)
        for kind, mixture in mixtures.items():
            runs: dict[int, list[dict]] = {workers: [] for workers in WORKER_COUNTS}
            for _ in range(args.rounds):
                for workers in WORKER_COUNTS:  # alternating, so that drift of the machine hits all alike
                    command = [sys.executable, __file__, "--worker", json.dumps([mixture, workers])]
                    command += ["--warmup", str(args.warmup), "--batches", str(args.batches)]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    runs[workers].append(json.loads(output.strip().splitlines()[-1]))
            results[kind] = []
            for workers, measured in runs.items():
                median = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
                results[kind].append(median)
                print(
                    f"{kind:12s} workers={workers}  {median['samples_per_s']:6.1f} samples/s  "
                    f"start-up {median['startup_s']:.2f} s  ({median['tiles_per_sample']:.1f} tiles, "
                    f"{median['text_tokens_per_sample']:.0f} text tokens per sample)"
                )
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "settings": {
            "preset": "small",
            "batch_size": BATCH,
            "batches": args.batches,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "results": results,
    }
    out = HERE / "results" / "data.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
