"""`blip3 post-train ...`: the tools around the DPO and safety stages (the stages themselves are recipes).

blip3 post-train noised-negatives CKPT pairs.jsonl out.jsonl --image-root DIR   the second DPO pass's data
blip3 post-train merge ADAPTER OUT [--official]       base + LoRA adapter -> one plain checkpoint
blip3 post-train lora-share [--preset NAME] [--rank R] the adapters' share of the LM, nothing allocated
blip3 post-train vlguard train.json out.json           VLGuard -> LLaVA conversations with a `safe` field
blip3 post-train sample sft.json out.json -n 5000      a seeded random sample of an SFT JSON list
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_noised_negatives(args: argparse.Namespace) -> None:
    from blip3.posttrain.noised import NoisedSettings, write_noised_negatives

    settings = NoisedSettings(
        noise_step=args.noise_step,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_images=args.max_images,
        min_chosen_words=args.min_chosen_words,
    )
    counts = write_noised_negatives(
        args.checkpoint, args.input, args.output, args.image_root, settings, only_new=args.only_new, device=args.device
    )
    print(
        f"{counts.written} noised-image negatives from {counts.rows} rows -> {args.output}; "
        f"skipped: {json.dumps(dict(counts.skipped))}"
    )


def cmd_merge(args: argparse.Namespace) -> None:
    from blip3.training.lora import export_merged

    model = export_merged(args.adapter, args.out, official=args.official, base=args.base)
    layout = "official xGen-MM" if args.official else "blip3"
    print(
        f"wrote the merged model ({sum(p.numel() for p in model.parameters()):,} parameters, {layout} layout) to {args.out}"
    )


def cmd_lora_share(args: argparse.Namespace) -> None:
    from blip3.training.lora import SAMPLER_LINEARS, LoraSettings, share_for_preset

    settings = LoraSettings(rank=args.rank, token_sampler=list(SAMPLER_LINEARS) if args.sampler else [])
    print(share_for_preset(args.preset, settings).describe())


def cmd_vlguard(args: argparse.Namespace) -> None:
    from blip3.posttrain.safety import read_json_list, vlguard_to_llava, write_json_list

    records = vlguard_to_llava(read_json_list(args.input))
    write_json_list(args.output, records)
    unsafe = sum(not r["safe"] for r in records)
    print(f"{len(records)} conversations ({unsafe} unsafe requests, {len(records) - unsafe} safe) -> {args.output}")


def cmd_sample(args: argparse.Namespace) -> None:
    from blip3.posttrain.safety import read_json_list, sample_records, write_json_list

    records = read_json_list(args.input)
    sample = sample_records(records, args.count, args.seed)
    write_json_list(args.output, sample)
    print(f"{len(sample)} of {len(records)} records -> {args.output}")


def add_commands(commands) -> None:
    post = commands.add_parser(
        "post-train",
        help="DPO / safety helpers: noised-image negatives, LoRA merge and share, VLGuard conversion, SFT samples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = post.add_subparsers(dest="tool", required=True, metavar="TOOL")

    noised = tools.add_parser("noised-negatives", help="add the model's answers on noised images as rejected answers")
    noised.add_argument("checkpoint", help="the model that answers: a checkpoint folder or a LoRA adapter folder")
    noised.add_argument("input", type=Path, help="a preference JSONL")
    noised.add_argument("output", type=Path, help="the new preference JSONL (input rows, then the new ones)")
    noised.add_argument(
        "--image-root", type=Path, help="where the rows' image paths point (default: the input's folder)"
    )
    noised.add_argument("--noise-step", type=int, default=500, help="DDPM step of 1000 (default 500: √ᾱ ≈ 0.28)")
    noised.add_argument("--seed", type=int, default=0)
    noised.add_argument("--batch-size", type=int, default=8)
    noised.add_argument("--max-new-tokens", type=int, default=128)
    noised.add_argument("--max-images", type=int, help="skip rows with more images (default: no limit)")
    noised.add_argument(
        "--min-chosen-words",
        type=int,
        default=0,
        help="skip prompts whose chosen answer has fewer words (yes / no questions: their noised answers all "
        "point one way); default 0: every prompt, as the paper",
    )
    noised.add_argument("--only-new", action="store_true", help="write only the new rows")
    noised.add_argument("--device", help="default: cuda if available, else cpu")
    noised.set_defaults(run=cmd_noised_negatives)

    merge = tools.add_parser("merge", help="fold a LoRA adapter into its base; write one plain checkpoint")
    merge.add_argument("adapter", help="an adapter folder (a LoRA run's checkpoint)")
    merge.add_argument("out", type=Path)
    merge.add_argument("--official", action="store_true", help="write the official xGen-MM layout")
    merge.add_argument("--base", help="the base checkpoint (default: the one the adapter names)")
    merge.set_defaults(run=cmd_merge)

    share = tools.add_parser("lora-share", help="LoRA parameters against the LM's, on the meta device")
    share.add_argument("--preset", default="xgen-mm-phi3-mini-v1.5")
    share.add_argument("--rank", type=int, default=64)
    share.add_argument("--sampler", action="store_true", help="adapters on the token sampler's linear layers too")
    share.set_defaults(run=cmd_lora_share)

    vlguard = tools.add_parser("vlguard", help="VLGuard train.json -> LLaVA conversations with a `safe` field")
    vlguard.add_argument("input", type=Path)
    vlguard.add_argument("output", type=Path)
    vlguard.set_defaults(run=cmd_vlguard)

    sample = tools.add_parser("sample", help="a seeded random sample of a JSON list (e.g. 5k SFT samples)")
    sample.add_argument("input", type=Path)
    sample.add_argument("output", type=Path)
    sample.add_argument("-n", "--count", type=int, required=True)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=cmd_sample)
