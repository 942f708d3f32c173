"""Memory (and time) of a DPO step: the reference as the adapter-disabled model vs a copied reference model.

Both variants train the same LoRA adapter with the same loss on the same batch; they differ only in
where the reference log-probabilities come from:

    adapter   the policy itself with its LoRA adapter switched off (`blip3.training.lora.disable_adapter`)
    copy      a frozen deep copy of the base model, held beside the policy (the usual way without adapters)

Each variant runs in its own subprocess, so its peak RSS is its own; the two alternate over rounds.

    python benchmarks/dpo.py                  # writes benchmarks/results/dpo.json
    python benchmarks/dpo.py --reference copy --worker   # one measurement (used internally)
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
IMAGES_PER_PROMPT = (0, 1, 2, 3)  # one pair per entry: prompts with 0 to 3 images, interleaved in the text
PROMPT_TOKENS, ANSWER_TOKENS = 48, (64, 40)  # chosen / rejected answers of different lengths (ragged rows)
IMAGE_SIZE = (640, 480)  # 5 tiles on the small preset
RANK = 32  # 2.31 % of the small preset's LM parameters, as the paper's ~2.5 %


def rss_mib() -> float:
    """The current resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def preference_batch(config) -> dict:
    """A `collate_preference`-shaped batch of random tokens and tiles (the step's cost does not depend on values)."""
    import torch

    from blip3.data.collate import collate
    from blip3.data.formats import Example

    g = torch.Generator().manual_seed(0)
    size = config.image_size
    examples = {"chosen": [], "rejected": []}
    for index, count in enumerate(IMAGES_PER_PROMPT):
        words = torch.randint(100, 30000, (PROMPT_TOKENS,), generator=g)
        slots = torch.linspace(2, PROMPT_TOKENS - 2, count).long() if count else torch.empty(0, dtype=torch.long)
        words[slots] = config.image_token_id  # <image>s spread through the prompt
        tiles = [config.num_tiles(IMAGE_SIZE)] * count
        pixels = torch.rand(sum(tiles), 3, size, size, generator=g) * 2 - 1 if count else None
        for side, length in zip(("chosen", "rejected"), ANSWER_TOKENS):
            answer = torch.randint(100, 30000, (length,), generator=g)
            ids = torch.cat([words, answer])
            labels = torch.cat([torch.full((PROMPT_TOKENS,), -100), answer])
            sizes = torch.tensor([IMAGE_SIZE] * count, dtype=torch.long).reshape(count, 2)
            length_spliced = len(ids) + count * (config.num_vision_tokens(IMAGE_SIZE) - 1)
            examples[side].append(
                Example(
                    f"pair{index}", ids, labels, pixels, sizes, torch.tensor(tiles, dtype=torch.long), length_spliced
                )
            )
    return {side: collate(rows, config.pad_token_id) for side, rows in examples.items()}


def worker(reference: str, steps: int) -> None:
    import torch

    from blip3.config import preset
    from blip3.modeling.model import Blip3ForConditionalGeneration
    from blip3.training.dpo import DPOObjective, DPOSettings
    from blip3.training.lora import LoraSettings, apply_lora, lora_share

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rss_start = rss_mib()
    model = Blip3ForConditionalGeneration(preset("small")).train()
    apply_lora(model, LoraSettings(rank=RANK, alpha=RANK, dropout=0.0))
    objective = DPOObjective(DPOSettings(beta=0.1), model.config.pad_token_id, model=model, reference=reference)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss_models = rss_mib()
    batch = preference_batch(model.config)
    losses, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss, stats = objective.micro_step(model, batch, normaliser=len(IMAGES_PER_PROMPT), device=torch.device("cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(stats["loss"] / len(IMAGES_PER_PROMPT))
    share = lora_share(model)
    reference_parameters = (
        sum(p.numel() for p in objective.reference_model.parameters()) if objective.reference_model else 0
    )
    print(
        json.dumps(
            {
                "reference": reference,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_models_mib": rss_models,
                "models_mib": rss_models - rss_start,
                "s_per_step": statistics.median(seconds[1:]) if steps > 1 else seconds[0],
                "all_s": seconds,
                "losses": losses,
                "reference_copy_parameters": reference_parameters,
                "lora": share.to_dict(),
                "sequences_per_step": 2 * len(IMAGES_PER_PROMPT),
                "response_tokens_per_step": stats["target_tokens"],
            }
        )
    )


def run_one(reference: str, steps: int) -> dict:
    # A fixed mmap threshold makes glibc return freed activation buffers to the system at once; with its
    # default (dynamic) threshold they stay in the heap and the peak RSS creeps up by ~200 MiB a step,
    # more than the difference measured here.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, __file__, "--worker", "--reference", reference, "--steps", str(steps)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", choices=["adapter", "copy"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternating adapter/copy rounds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dpo.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args.reference, args.steps)

    runs = {"adapter": [], "copy": []}
    for _ in range(args.rounds):
        for reference in ("copy", "adapter"):
            runs[reference].append(run_one(reference, args.steps))
            shown = {k: v for k, v in runs[reference][-1].items() if k not in ("all_s", "lora")}
            print(f"{reference:8s} {json.dumps(shown)}", flush=True)
    if runs["adapter"][0]["losses"] != runs["copy"][0]["losses"]:
        raise SystemExit("the two references gave different losses: they must be the same base model")
    results = {"machine": platform.processor() or platform.machine(), "threads": 1, "preset": "small", **runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}\n")
    print(summary_table(results))


def summary_table(results: dict) -> str:
    median = {
        reference: {
            key: statistics.median(run[key] for run in runs) for key in ("peak_rss_mib", "models_mib", "s_per_step")
        }
        for reference, runs in ((r, results[r]) for r in ("copy", "adapter"))
    }
    rows = ["| reference | peak RSS | model(s) in memory | s / step |", "|---|---|---|---|"]
    for reference, label in (("copy", "copied reference model"), ("adapter", "adapter disabled (ours)")):
        m = median[reference]
        rows.append(f"| {label} | {m['peak_rss_mib']:.0f} MiB | {m['models_mib']:.0f} MiB | {m['s_per_step']:.2f} |")
    saved = median["copy"]["peak_rss_mib"] - median["adapter"]["peak_rss_mib"]
    share = results["adapter"][0]["lora"]
    rows.append(
        f"\nThe adapter-disabled reference saves {saved:.0f} MiB of peak RSS "
        f"({100 * saved / median['copy']['peak_rss_mib']:.0f} %); the losses of both are identical. LoRA rank {RANK}: "
        f"{share['adapter_parameters']['language_model']:,} parameters = {100 * share['language_model_share']:.2f} % "
        f"of the LM's {share['language_model_parameters']:,}."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
