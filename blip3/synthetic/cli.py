"""`blip3 world` and `blip3 stage0`: build the synthetic world, train its vision tower.

blip3 world runs/world                    # the demo's world (≈20k small images, about half a minute)
blip3 stage0 runs/world --out runs/stage0 # a tiny SigLIP on its caption pairs (a few minutes on 2 cores)
"""

from __future__ import annotations

import time
from pathlib import Path


def cmd_world(args) -> None:
    from blip3.synthetic.world import WorldSpec
    from blip3.synthetic.write import WorldSizes, build_world

    sizes = WorldSizes.smoke() if args.sizes == "smoke" else WorldSizes.demo()
    start = time.perf_counter()
    manifest = build_world(args.out, sizes, WorldSpec(tile_size=args.tile_size), seed=args.seed, workers=args.workers)
    seconds = time.perf_counter() - start
    test = manifest["counts"]["test"]
    print(
        f"wrote {manifest['num_images']:,} images to {args.out} in {seconds:.1f} s; "
        f"mixtures: {', '.join(manifest['mixtures'].values())}; test questions: {sum(test.values()):,}"
    )


def cmd_stage0(args) -> None:
    from blip3.synthetic.stage0 import Stage0Settings, train_stage0

    settings = Stage0Settings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    metrics = train_stage0(args.world, args.out, settings)
    retrieval, before = metrics["retrieval"], metrics["retrieval_before"]
    print(
        f"stage 0 done in {metrics['seconds']:.0f} s: loss {metrics['first_loss']:.2f} -> {metrics['final_loss']:.2f}; "
        f"validation image->caption top-1 {retrieval['top1']:.1%} (untrained {before['top1']:.1%}, "
        f"chance {retrieval['chance_top1']:.1%}), top-5 {retrieval['top5']:.1%}"
    )
    if metrics["patch_probe"] is not None:
        probe, untrained = metrics["patch_probe"], metrics["patch_probe_before"]
        print(
            f"patch probe (linear, what the VLM reads): colour {probe['colour']:.1%} (untrained {untrained['colour']:.1%}), "
            f"shape {probe['shape']:.1%} (untrained {untrained['shape']:.1%})"
        )
    print(f"vision tower: {Path(args.out) / 'vision_tower'}; metrics: {Path(args.out) / 'metrics.json'}")


def add_commands(commands) -> None:
    world = commands.add_parser("world", help="build the synthetic vision-language world (data, splits, tokenizer)")
    world.add_argument("out", type=Path, help="folder to write the world into")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--sizes", choices=["demo", "smoke"], default="demo", help="how many samples (default: demo)")
    world.add_argument("--tile-size", type=int, default=56, help="the vision tower's tile side in pixels")
    world.add_argument("--workers", type=int, default=2, help="processes writing the parts in parallel")
    world.set_defaults(run=cmd_world)

    stage0 = commands.add_parser("stage0", help="train the world's vision tower (a tiny SigLIP) on its caption pairs")
    stage0.add_argument("world", type=Path, help="a folder written by `blip3 world`")
    stage0.add_argument("--out", type=Path, default=Path("runs/stage0"))
    stage0.add_argument("--steps", type=int, default=300)
    stage0.add_argument("--batch-size", type=int, default=96)
    stage0.add_argument("--lr", type=float, default=5e-4)
    stage0.add_argument("--seed", type=int, default=0)
    stage0.set_defaults(run=cmd_stage0)
