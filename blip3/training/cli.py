"""`blip3 train RECIPE.yaml [section.field=value ...] [--resume]`."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> None:
    from blip3.training.config import load_config
    from blip3.training.trainer import train

    config = load_config(args.recipe, args.overrides)
    result = train(config, resume=args.resume)
    print(f"finished {result.steps} steps, last loss {result.last_loss:.4f}; checkpoint {result.final_checkpoint}")


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train",
        help="run a training recipe (one CPU, or many processes under torchrun)",
        description="Run a training recipe. Launch under `torchrun --nproc_per_node=N -m blip3.cli train ...` "
        "for data-parallel training (train.strategy=ddp or fsdp).",
    )
    train.add_argument("recipe", help="a recipe YAML (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. optim.lr=3e-4 train.steps=100")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of the run (or the one given)",
    )
    train.set_defaults(run=cmd_train)
