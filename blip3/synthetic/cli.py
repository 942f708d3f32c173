"""`blip3 world`, `blip3 stage0`, `blip3 probe-captions`: build the synthetic world, train its vision
tower, see which caption words a model reads off the image.

blip3 world runs/world                    # the demo's world (≈20k small images, about half a minute)
blip3 world runs/test-1500 --test-split-of runs/world --per-task 1500   # a larger test split of it
blip3 stage0 runs/world --out runs/stage0 # a tiny SigLIP on its caption pairs (a few minutes on 2 cores)
blip3 probe-captions runs/demo/stages/pretrain --world runs/world   # teacher-forced caption words
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def cmd_world(args) -> None:
    from blip3.synthetic.world import WorldSpec
    from blip3.synthetic.write import WorldSizes, build_world, write_test_split

    start = time.perf_counter()
    if args.test_split_of is not None:
        given = [
            flag
            for flag, value in (("--seed", args.seed), ("--sizes", args.sizes), ("--tile-size", args.tile_size))
            if value is not None
        ]
        if given:
            raise SystemExit(
                f"{', '.join(given)}: a test split is drawn with the seed, sizes and spec of {args.test_split_of}"
            )
        per_task = 1500 if args.per_task is None else args.per_task
        try:
            manifest = write_test_split(args.test_split_of, args.out, per_task)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            raise SystemExit(f"blip3 world: {error}") from None
        test = manifest["counts"]["test"]
        print(
            f"wrote a test split of {args.test_split_of} to {args.out} in {time.perf_counter() - start:.1f} s: "
            f"{manifest['num_images']:,} images, {sum(test.values()):,} questions ({per_task:,} per task); "
            f"evaluate with `blip3 eval CHECKPOINT --benchmark synthetic --data {args.out}/eval/test/single.json ...`"
        )
        return
    if args.per_task is not None:
        raise SystemExit("--per-task sizes a test split: give it with --test-split-of WORLD")
    sizes = WorldSizes.smoke() if args.sizes == "smoke" else WorldSizes.demo()
    manifest = build_world(
        args.out, sizes, WorldSpec(tile_size=args.tile_size or 56), seed=args.seed or 0, workers=args.workers
    )
    seconds = time.perf_counter() - start
    test = manifest["counts"]["test"]
    print(
        f"wrote {manifest['num_images']:,} images to {args.out} in {seconds:.1f} s; "
        f"mixtures: {', '.join(manifest['mixtures'].values())}; test questions: {sum(test.values()):,}"
    )


def cmd_stage0(args) -> None:
    from blip3.synthetic.stage0 import Stage0Settings, text_sizes, train_stage0

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
    if metrics["text_retrieval"] is not None:
        reads, untrained = metrics["text_retrieval"], metrics["text_retrieval_before"]
        print(
            f"text tiles -> their string top-1 {reads['top1']:.1%} (untrained {untrained['top1']:.1%}, "
            f"chance {reads['chance_top1']:.1%}){text_sizes(metrics)}"
        )
    print(f"vision tower: {Path(args.out) / 'vision_tower'}; metrics: {Path(args.out) / 'metrics.json'}")


def cmd_probe_captions(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from blip3.factory import load_pretrained
    from blip3.synthetic.caption_probe import CATEGORIES, probe_captions, world_test_captions
    from blip3.training.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(args.checkpoint) or args.checkpoint  # a stage's folder or a checkpoint
    model, processor = load_pretrained(checkpoint)
    samples, held_out = world_test_captions(args.world, args.limit)
    result = probe_captions(model, processor, samples, held_out)
    table = Table(title=f"caption words predicted right, teacher-forced: {result.captions} test captions")
    for column in ("words", "right (%)", "n"):
        table.add_column(column, justify="left" if column == "words" else "right")
    for category in CATEGORIES:
        accuracy = result.accuracy(category)
        table.add_row(category, "—" if accuracy is None else f"{accuracy:.1f}", str(result.total[category]))
    console = Console()
    console.print(f"checkpoint: {checkpoint}")
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(checkpoint), **result.to_dict()}, indent=1) + "\n")


def add_commands(commands) -> None:
    from blip3.synthetic.stage0 import Stage0Settings

    world = commands.add_parser("world", help="build the synthetic vision-language world (data, splits, tokenizer)")
    world.add_argument("out", type=Path, help="folder to write the world into")
    world.add_argument("--seed", type=int, default=None, help="default 0")
    world.add_argument("--sizes", choices=["demo", "smoke"], default=None, help="how many samples (default: demo)")
    world.add_argument(
        "--tile-size", type=int, default=None, help="the vision tower's tile side in pixels (default 56)"
    )
    world.add_argument("--workers", type=int, default=2, help="processes writing the parts in parallel")
    world.add_argument(
        "--test-split-of",
        type=Path,
        metavar="WORLD",
        help="write only a larger test split of WORLD (its seed, sizes and spec), for finer comparisons",
    )
    world.add_argument(
        "--per-task",
        type=int,
        default=None,
        help="with --test-split-of: questions per task, POPE and safety in proportion (default 1500)",
    )
    world.set_defaults(run=cmd_world)

    stage0 = commands.add_parser(
        "stage0", help="train the world's vision tower (a tiny SigLIP) on its captions and text"
    )
    stage0.add_argument("world", type=Path, help="a folder written by `blip3 world`")
    stage0.add_argument("--out", type=Path, default=Path("runs/stage0"))
    defaults = Stage0Settings()
    stage0.add_argument("--steps", type=int, default=defaults.steps)
    stage0.add_argument("--batch-size", type=int, default=defaults.batch_size)
    stage0.add_argument("--lr", type=float, default=defaults.learning_rate, help="the image tower's")
    stage0.add_argument("--seed", type=int, default=0)
    stage0.set_defaults(run=cmd_stage0)

    probe = commands.add_parser(
        "probe-captions",
        help="which words of the world's test captions a model predicts from the image (teacher-forced)",
    )
    probe.add_argument("checkpoint", type=Path, help="a checkpoint, or a stage's folder (its newest checkpoint)")
    probe.add_argument("--world", type=Path, required=True, help="the folder `blip3 world` wrote")
    probe.add_argument("--limit", type=int, help="only the first N test captions (default: all)")
    probe.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    probe.set_defaults(run=cmd_probe_captions)
