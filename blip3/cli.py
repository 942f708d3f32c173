"""`blip3`: one command, one sub-command per job.

blip3 info      configuration, parameters per part, vision tokens per image size (no weights loaded)
blip3 convert   official xGen-MM layout ⇄ blip3's own
blip3 generate  one prompt with one or more images -> text
blip3 demo      the whole recipe on the synthetic world, offline on a CPU (--quick: inference only)

and, from their packages: world, stage0 (the synthetic world), train, post-train, eval, eval-report,
serve, chat, ablate.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch


def _load_config(args):
    """The config of `--preset NAME` or of a checkpoint folder (official or ours), without any weights."""
    from blip3.config import Blip3Config, preset
    from blip3.interop.xgenmm import config_from_official, read_official_config

    if args.preset:
        return preset(args.preset)
    if not args.checkpoint:
        raise SystemExit("blip3 info: give a CHECKPOINT folder or --preset NAME")
    official = read_official_config(args.checkpoint)
    return config_from_official(official) if official is not None else Blip3Config.from_pretrained(args.checkpoint)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 640x480 (W x H), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return width, height


def cmd_info(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from blip3.modeling.model import Blip3ForConditionalGeneration

    config = _load_config(args)
    with torch.device("meta"):  # shapes only: counting 4B parameters allocates nothing
        model = Blip3ForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    vision, text, sampler = config.vision_config, config.text_config, config.sampler_config

    console = Console()
    parts = Table(title="blip3 model", show_edge=False)
    for column in ("part", "architecture", "parameters", "trainable"):
        parts.add_column(column, justify="right" if column in ("parameters",) else "left")
    parts.add_row(
        "vision tower",
        f"{vision.model_type} {vision.hidden_size}d × {vision.num_hidden_layers}, {vision.image_size}px/{vision.patch_size}",
        f"{count(model.model.vision_tower):,}",
        "frozen",
    )
    parts.add_row(
        "token sampler",
        f"perceiver {sampler.input_dim}→{sampler.output_dim}, {sampler.num_latents} latents × {sampler.depth}",
        f"{count(model.model.token_sampler):,}",
        "yes",
    )
    parts.add_row(
        "language model",
        f"{text.model_type} {text.hidden_size}d × {text.num_hidden_layers}, vocab {config.vocab_size:,}",
        f"{count(model.model.language_model) + count(model.lm_head):,}",
        "yes",
    )
    parts.add_row("total", "", f"{count(model):,}", "")
    console.print(parts)
    console.print(
        f"vision tokens: mode [bold]{config.vision_token_mode}[/], grids (cols×rows) "
        f"{', '.join(f'{c}×{r}' for c, r in config.anyres_grids)}, stripe regrouping {config.stripe_regrouping}"
    )
    if args.image_size:
        sizes = Table(show_edge=False)
        for column in ("image (W×H)", "grid", "tiles", "vision tokens"):
            sizes.add_column(column)
        for size in args.image_size:
            cols, rows = config.image_grid(size)
            grid = "—" if config.vision_token_mode == "base" else f"{cols}×{rows}"
            sizes.add_row(
                f"{size[0]}×{size[1]}", grid, str(config.num_tiles(size)), str(config.num_vision_tokens(size))
            )
        console.print(sizes)


def cmd_convert(args) -> None:
    from blip3.factory import has_tokenizer, load_processor
    from blip3.interop.xgenmm import read_official_config, save_official
    from blip3.modeling.model import Blip3ForConditionalGeneration

    source_is_official = read_official_config(args.source) is not None
    target = args.to or ("blip3" if source_is_official else "official")
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = Blip3ForConditionalGeneration.from_pretrained(args.source, dtype=dtype)
    if target == "official":
        save_official(model, args.destination, max_shard_size=args.max_shard_size)
    else:
        model.save_pretrained(args.destination, max_shard_size=args.max_shard_size)
    if has_tokenizer(args.source):
        processor = load_processor(args.source, model.config)
        # the released folders carry the tokenizer only; ours carry the whole processor
        (processor.tokenizer if target == "official" else processor).save_pretrained(args.destination)
    else:
        print(f"note: {args.source} has no tokenizer, so {args.destination} has none either")
    print(
        f"wrote a {target} checkpoint of {sum(p.numel() for p in model.parameters()):,} parameters to {args.destination}"
    )


def cmd_generate(args) -> None:
    from transformers import TextStreamer

    from blip3.factory import load_pretrained

    model, processor = load_pretrained(args.checkpoint)
    model.eval()
    prompt = args.prompt
    if args.image and "<image>" not in prompt:
        prompt = "<image>\n" * len(args.image) + prompt  # as the original SFT data places a lone image
    conversation = [{"role": "user", "content": prompt}]
    if args.system is not None:
        conversation.insert(0, {"role": "system", "content": args.system})
    inputs = processor.process_conversations(conversation, args.image or None, add_generation_prompt=True)
    streamer = None if args.no_stream else TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.temperature > 0
        else dict(do_sample=False)
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    new_tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    if args.no_stream:
        print(processor.decode_generated(new_tokens)[0])


def cmd_demo(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from blip3.quickstart import run

        run(args.out)
    else:
        from blip3.demo import STAGES, WITH_TAGS, run_demo

        stages = WITH_TAGS if args.tags else STAGES
        run_demo(args.out, profile_name=args.profile, seed=args.seed, stages=stages, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip3", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="configuration, parameter counts, vision tokens per image size")
    info.add_argument("checkpoint", nargs="?", help="a checkpoint folder (official xGen-MM or blip3)")
    info.add_argument("--preset", help="a named configuration instead of a checkpoint (e.g. xgen-mm-phi3-mini-v1.5)")
    info.add_argument(
        "--image-size",
        type=_parse_size,
        action="append",
        metavar="WxH",
        help="report vision tokens for this image size (repeatable)",
    )
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="official xGen-MM layout <-> blip3 layout")
    convert.add_argument("source", help="checkpoint folder or hub id")
    convert.add_argument("destination", type=Path)
    convert.add_argument("--to", choices=["blip3", "official"], help="default: the other layout than the source's")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: keep the stored dtype")
    convert.add_argument("--max-shard-size", default="5GB")
    convert.set_defaults(run=cmd_convert)

    generate = commands.add_parser("generate", help="answer one prompt about one or more images")
    generate.add_argument("checkpoint", help="checkpoint folder or hub id (official xGen-MM or blip3)")
    generate.add_argument(
        "--prompt", required=True, help="the question; put <image> where each image goes (default: all first)"
    )
    generate.add_argument(
        "--image", action="append", metavar="PATH", help="an image file (repeatable, in <image> order)"
    )
    generate.add_argument("--system", help="system prompt (default: the xGen-MM one)")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument(
        "--no-stream", action="store_true", help="print the answer at the end instead of streaming it"
    )
    generate.set_defaults(run=cmd_generate)

    demo = commands.add_parser(
        "demo", help="the whole recipe on the synthetic world: data, stage 0, training stages, evaluation (CPU)"
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the demo writes everything")
    demo.add_argument("--profile", choices=["full", "smoke"], default="full", help="smoke: a tiny version in a minute")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--tags",
        action="store_true",
        help="add a stage of tag lists after pre-training (900 steps, 2-3 min), replayed in SFT: colour answers "
        "better, other tasks may fall",
    )
    demo.add_argument(
        "--resume",
        action="store_true",
        help="keep stage 0 and the stages already finished in --out with the same recipe, up to the first that "
        "is not (a run cut short goes on from there); evaluation and the report are redone",
    )
    demo.add_argument(
        "--quick", action="store_true", help="only the inference path on an untrained tiny model (seconds)"
    )
    demo.set_defaults(run=cmd_demo)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(commands)
    return parser


# Packages that bring their own sub-commands: each module has `add_commands(commands)`, which adds its
# sub-parsers (with `set_defaults(run=...)`) to the `blip3` command.
COMMAND_MODULES: tuple[str, ...] = (
    "blip3.synthetic.cli",
    "blip3.training.cli",
    "blip3.posttrain.cli",
    "blip3.serving.cli",
    "blip3.evaluation.cli",
    "blip3.ablation",
)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
