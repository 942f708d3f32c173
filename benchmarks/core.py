"""Core speed and memory: any-res pre-processing, one training step, greedy generation.

blip3 and an original-style baseline (benchmarks/original_style.py) run side by side on the "small"
preset, fp32, 2 threads. Each measurement runs in its own subprocess so its peak RSS is its own; the
two implementations alternate so that drift of the machine hits both alike.

    python benchmarks/core.py                 # all cases, writes benchmarks/results/core.json
    python benchmarks/core.py --case b --impl blip3 --worker   # one measurement (used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = [
    (300, 300),
    (640, 480),
    (1200, 300),
    (300, 1200),
    (800, 400),
    (1024, 768),
    (480, 640),
    (1920, 1080),
    (224, 224),
    (500, 1000),
]
BATCH, TEXT_TOKENS, TRAIN_IMAGE = 4, 256, (640, 480)  # (b): 4 × (1 image → 5 tiles + 256 text tokens)
NEW_TOKENS, PROMPT_TOKENS = 32, 32  # (c): 32 greedy tokens after a 32-token prompt with one 5-tile image


def images(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return [pool[i % len(pool)] for i in range(n)]


def small_model(impl: str):
    import torch

    from blip3.config import preset
    from blip3.modeling.model import Blip3ForConditionalGeneration

    torch.manual_seed(0)
    model = Blip3ForConditionalGeneration(preset("small"))
    if impl == "original":
        sys.path.insert(0, str(HERE))
        from original_style import make_original_style

        model = make_original_style(model)
    return model


def tiles_for(model, size):
    import torch

    g = torch.Generator().manual_seed(1)
    s = model.config.image_size
    return torch.rand(model.config.num_tiles(size), 3, s, s, generator=g) * 2 - 1


# -- the three measurements ----------------------------------------------------------------------


def case_a(impl: str, repeats: int) -> dict:
    """Any-res pre-processing of 1000 in-memory images, one call per image."""
    from blip3.config import preset
    from blip3.processing.image import Blip3ImageProcessor

    config = preset("small")
    pool = images(1000)
    if impl == "blip3":
        processor = Blip3ImageProcessor.from_model_config(config)
        run = lambda image: processor([image])["pixel_values"]  # noqa: E731
    else:
        sys.path.insert(0, str(HERE))
        from original_style import original_preprocess

        grids = tuple(map(tuple, config.anyres_grids))
        run = lambda image: original_preprocess(image, grids, config.image_size)  # noqa: E731
    for image in pool[: len(SIZES)]:
        run(image)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in pool:
            run(image)
        times.append((time.perf_counter() - start) / len(pool))
    return {"ms_per_image": 1e3 * statistics.median(times), "all_ms_per_image": [1e3 * t for t in times]}


def case_b(impl: str, repeats: int) -> dict:
    """Forward + backward + AdamW for 4 × (one 640×480 image → 5 tiles, 256 supervised text tokens)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = small_model(impl).train()
    g = torch.Generator().manual_seed(2)
    image_id = model.config.image_token_id
    ids = torch.randint(100, 30000, (BATCH, TEXT_TOKENS + 1), generator=g)
    ids[:, 1] = image_id  # <image> right after the first token; 256 text tokens around it
    labels = ids.clone()
    pixels = [[tiles_for(model, TRAIN_IMAGE)] for _ in range(BATCH)]
    sizes = [[TRAIN_IMAGE]] * BATCH
    trainable = [p for p in model.parameters() if p.requires_grad]
    # blip3 trains with the fused CPU/GPU AdamW kernel; the original used torch's default (foreach)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=impl == "blip3")

    def step():
        loss = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, optimizer state)
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    return {"s_per_step": seconds, "all_s": times, "gflop": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}


def case_c(impl: str, repeats: int) -> dict:
    """Greedy generation of 32 new tokens for one sample with one 640×480 image (5 tiles)."""
    import torch

    model = small_model(impl).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(100, 30000, (1, PROMPT_TOKENS), generator=g)
    ids[0, 2] = model.config.image_token_id
    pixels = [[tiles_for(model, TRAIN_IMAGE)]]
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    def run():
        return model.generate(input_ids=ids, pixel_values=pixels, image_sizes=[[TRAIN_IMAGE]], **kwargs)

    tokens = run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"s_per_generation": statistics.median(times), "all_s": times, "tokens": tokens[0].tolist()}


CASES = {"a": case_a, "b": case_b, "c": case_c}
REPEATS = {"a": 3, "b": 5, "c": 7}


def worker(case: str, impl: str, repeats: int) -> None:
    import torch

    torch.set_num_threads(2)
    result = CASES[case](impl, repeats)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def matmul_peak() -> float:
    """fp32 GFLOP/s of a 2048² matmul on 2 threads: the ceiling the training step is judged against."""
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def run_one(case: str, impl: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--impl", impl, "--repeats", str(REPEATS[case])]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--impl", choices=["blip3", "original"])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--rounds", type=int, default=2, help="alternating blip3/original rounds per case")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "core.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args.case[0], args.impl, args.repeats or REPEATS[args.case[0]])

    results = {
        "machine": platform.processor() or platform.machine(),
        "threads": 2,
        "matmul_peak_gflop_s": matmul_peak(),
    }
    print(f"fp32 matmul peak on 2 threads: {results['matmul_peak_gflop_s']:.0f} GFLOP/s", flush=True)
    for case in args.case or sorted(CASES):
        runs = {"blip3": [], "original": []}
        for _ in range(args.rounds):
            for impl in ("original", "blip3"):
                runs[impl].append(run_one(case, impl))
                print(
                    f"({case}) {impl:8s} {json.dumps({k: v for k, v in runs[impl][-1].items() if not k.startswith('all')})}",
                    flush=True,
                )
        results[case] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}\n")
    print(summary_table(results))


def summary_table(results: dict) -> str:
    """Markdown rows: median over rounds of each implementation, and their ratio."""
    metrics = {
        "a": ("ms_per_image", "ms / image"),
        "b": ("s_per_step", "s / step"),
        "c": ("s_per_generation", "s / generation"),
    }
    rows = ["| case | metric | original-style | blip3 | speed-up | blip3 peak RSS |", "|---|---|---|---|---|---|"]
    for case, (key, unit) in metrics.items():
        if case not in results:
            continue
        median = {impl: statistics.median(run[key] for run in runs) for impl, runs in results[case].items()}
        rss = statistics.median(run["peak_rss_mib"] for run in results[case]["blip3"])
        rows.append(
            f"| ({case}) | {unit} | {median['original']:.3g} | {median['blip3']:.3g} | "
            f"{median['original'] / median['blip3']:.2f}× | {rss:.0f} MiB |"
        )
    if "b" in results:
        runs = results["b"]["blip3"]
        gflop = runs[0]["gflop"]
        seconds = statistics.median(run["s_per_step"] for run in runs)
        peak = results["matmul_peak_gflop_s"]
        rows.append(
            f"\n(b) blip3 does {gflop:.0f} GFLOP per step (original-style: {results['b']['original'][0]['gflop']:.0f}); "
            f"{gflop / seconds:.0f} GFLOP/s = {100 * gflop / seconds / peak:.0f}% of the {peak:.0f} GFLOP/s matmul peak."
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
