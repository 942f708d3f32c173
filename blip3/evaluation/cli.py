"""`blip3 eval` (a checkpoint on a benchmark) and `blip3 eval-report` (several results, one report).

    blip3 eval runs/sft/final --benchmark synthetic --data world/test.json --out runs/eval/sft
    blip3 eval ckpt/ --benchmark vqav2 --data vqav2/ --mode base --shots 4 --support vqav2-train/ --out runs/eval/vqa4
    blip3 eval-report runs/eval/pretrain/results.json runs/eval/sft/results.json --out runs/eval/report

`eval` writes results.json (every answer, its score, each task's numbers) and a report of that one
run (report.md, report.json, scores.png); `eval-report` compares several runs, one column each.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(commands) -> None:
    from blip3.evaluation.adapters import BENCHMARKS

    benchmarks = "\n".join(f"  {b.name:<14} {b.description}" for b in BENCHMARKS.values())
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on a benchmark; writes results.json and a report",
        description=__doc__,
        epilog=f"benchmarks (--data is the file or folder as distributed):\n{benchmarks}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder or hub id (official xGen-MM or blip3)")
    evaluate.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which reader and metrics")
    evaluate.add_argument(
        "--data",
        required=True,
        action="append",
        type=Path,
        metavar="PATH",
        help="the benchmark's file or folder, as it is distributed (repeatable: the items are joined)",
    )
    evaluate.add_argument("--image-root", type=Path, help="look for images here first")
    evaluate.add_argument("--out", required=True, type=Path, help="folder for results.json and the report")
    evaluate.add_argument(
        "--mode",
        choices=["instruct", "base"],
        help="instruct: chat template; base: raw few-shot prompts (default: base when --shots is given)",
    )
    evaluate.add_argument("--shots", type=int, help="base models: examples per prompt (0, 4, 8, ...)")
    evaluate.add_argument(
        "--support",
        action="append",
        type=Path,
        metavar="PATH",
        help="where few-shot examples come from, in the benchmark's format (default: the evaluated items)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N items")
    evaluate.add_argument("--max-new-tokens", type=int, help="for every item (default: per metric)")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the choice of few-shot examples")
    evaluate.add_argument(
        "--label",
        help="the model's name in reports (default: the checkpoint folder's name; a training step's is run/step-N)",
    )
    evaluate.add_argument("--device", help="default: cuda when available, else cpu")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored")
    evaluate.set_defaults(run=cmd_eval)

    report = commands.add_parser("eval-report", help="one report (markdown, JSON, plot) from several results.json")
    report.add_argument("results", nargs="+", type=Path, help="results.json files, one column each, in this order")
    report.add_argument("--out", required=True, type=Path)
    report.add_argument("--title", default="blip3 evaluation")
    report.add_argument("--labels", nargs="+", help="the columns' names, one per results file (default: their labels)")
    report.set_defaults(run=cmd_eval_report)


def cmd_eval(args) -> None:
    import torch

    from blip3.evaluation.adapters import load_benchmark
    from blip3.evaluation.report import write_report
    from blip3.evaluation.runner import evaluate
    from blip3.factory import load_pretrained

    items = [item for path in args.data for item in load_benchmark(args.benchmark, path, args.image_root)]
    if args.limit is not None:
        items = items[: args.limit]
    support = None
    if args.support:
        support = [item for path in args.support for item in load_benchmark(args.benchmark, path, args.image_root)]
    mode = args.mode or ("base" if args.shots is not None else "instruct")

    model_kwargs = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    model, processor = load_pretrained(args.checkpoint, **model_kwargs)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    label = args.label or default_label(args.checkpoint)
    results = evaluate(
        model,
        processor,
        items,
        batch_size=args.batch_size,
        mode=mode,
        shots=args.shots or 0,
        support=support,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        label=label,
        benchmark=args.benchmark,
    )
    results.save(args.out / "results.json")
    paths = write_report([results], args.out, title=f"{label} on {args.benchmark}")
    _print_summary(results)
    print(f"wrote {args.out / 'results.json'}, {paths['markdown']}, {paths['plot']}")


def default_label(checkpoint: str | Path) -> str:
    """The checkpoint folder's name, or for a trainer's `<run>/checkpoints/step-N` folder `<run>/step-N`: every
    training run names its checkpoints alike, so two runs' step folders would share a column name."""
    from blip3.training.checkpoint import STEP_DIR

    path = Path(str(checkpoint).rstrip("/"))
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def cmd_eval_report(args) -> None:
    from blip3.evaluation.report import write_report
    from blip3.evaluation.runner import EvalResults

    results = [EvalResults.load(path) for path in args.results]
    if args.labels is not None:
        if len(args.labels) != len(results):
            raise SystemExit(f"--labels names {len(args.labels)} columns for {len(results)} results files")
        for result, label in zip(results, args.labels):
            result.label = label
    try:  # one label may span several results (a model on several benchmarks), but not the same task twice
        paths = write_report(results, args.out, title=args.title)
    except ValueError as error:
        raise SystemExit(f"blip3 eval-report: {error}") from None
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")


def _print_summary(results) -> None:
    from rich.console import Console
    from rich.table import Table

    from blip3.evaluation.scoring import PRIMARY_METRIC

    table = Table(title=f"{results.label} on {results.benchmark}", show_edge=False)
    for column in ("task", "metric", "n", "score"):
        table.add_column(column, justify="right" if column in ("n", "score") else "left")
    for task, summary in results.tasks.items():
        metric = next(item.metric for item in results.items if item.task == task)
        primary = PRIMARY_METRIC[metric]
        table.add_row(task, f"{metric}: {primary}", str(summary["n"]), f"{summary[primary]:.1f}")
    Console().print(table)
