"""Report: the results of one or more models -> report.md, report.json and scores.png.

    write_report([pretrain, sft, dpo], "runs/demo/report")     # EvalResults, or paths to results.json

Each result's `label` is a column (a training stage, say), in the order given, so the table reads
like the recipe, left to right; each task is a row. The markdown holds a summary table of each
task's main number per stage (with the change from the first stage to the last), a table per task
with all its numbers, the change each stage made and its breakdowns (categories, facets), a few
example answers per task from the last stage, and the settings; the JSON holds the same numbers for
programs; the plot shows the summary as grouped bars. Every number that can be recomputed on
resampled items comes with its 95 % interval, and every change between stages with its paired one
(`uncertainty.py`), so that a newcomer can tell a change from noise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip3.evaluation.runner import EvalResults
from blip3.evaluation.scoring import CATEGORY_METRIC, LOWER_IS_BETTER, PRIMARY_METRIC
from blip3.evaluation.uncertainty import interval, paired_change, statistic

METRIC_NAMES = {
    "vqa_accuracy": "VQA accuracy",
    "cider": "CIDEr",
    "anls": "ANLS",
    "exact_match": "exact match",
    "multiple_choice": "multiple choice",
    "pope": "POPE",
    "grounding": "grounding",
    "refusal": "refusal",
}


def write_report(
    results: Sequence[EvalResults | str | Path],
    out_dir: str | Path,
    title: str = "blip3 evaluation",
    examples_per_task: int = 3,
) -> dict[str, Path]:
    """Write report.md, report.json and scores.png into `out_dir`; returns their paths by kind."""
    results = [r if isinstance(r, EvalResults) else EvalResults.load(r) for r in results]
    if not results:
        raise ValueError("no results to report")
    table = collect(results)  # before anything is written: it refuses results that cannot share one table
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "plot": out_dir / "scores.png",
    }
    paths["json"].write_text(json.dumps({"title": title, **table}, indent=1, ensure_ascii=False) + "\n", "utf-8")
    plot_scores(table, paths["plot"], title)
    paths["markdown"].write_text(_markdown(table, results, title, paths["plot"].name, examples_per_task), "utf-8")
    return paths


def collect(results: Sequence[EvalResults], uncertainty: bool = True) -> dict[str, Any]:
    """{"stages": [labels], "tasks": {task: {...}}, "settings": ...}; a task holds its `metric`, `primary`
    (the main number's name), `scores` {stage: summary} and, with `uncertainty`, `intervals`
    {stage: {number: [low, high]}} and `changes` [{"from", "to", "number", "delta", "ci95", "n"}]: each
    stage against the one before it, and the last against the first, for every number that can be
    resampled. (A console table of the main numbers needs no `uncertainty`.)"""
    stages = list(dict.fromkeys(r.label for r in results))
    tasks: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, Any]] = {}
    answers = _answers(results)
    for result in results:
        settings.setdefault(result.label, {})[result.benchmark or "items"] = result.settings
        for task, summary in result.tasks.items():
            metric = answers[result.label][task][0].metric
            entry = tasks.setdefault(task, {"metric": metric, "primary": PRIMARY_METRIC[metric], "scores": {}})
            if entry["metric"] != metric:
                raise ValueError(f"task {task!r} is scored as {entry['metric']} in one result and {metric} in another")
            if result.label in entry["scores"]:
                raise ValueError(
                    f"two results are labelled {result.label!r}: name the columns with --labels (blip3 eval-report) or "
                    f"give each a distinct label; both report task {task!r}"
                )
            entry["scores"][result.label] = summary
    if not uncertainty:
        return {"stages": stages, "tasks": tasks, "settings": settings}
    for task, entry in tasks.items():
        by_stage = {stage: answers[stage][task] for stage in entry["scores"]}
        some_items = next(iter(by_stage.values()))
        resampled = [name for name in next(iter(entry["scores"].values())) if statistic(some_items, name)]
        entry["intervals"] = {
            stage: {name: interval(items, name) for name in resampled} for stage, items in by_stage.items()
        }
        present = [stage for stage in stages if stage in by_stage]
        pairs = list(zip(present, present[1:])) + ([(present[0], present[-1])] if len(present) > 2 else [])
        entry["changes"] = [
            {"from": before, "to": after, "number": name, **paired_change(by_stage[before], by_stage[after], name)}
            for before, after in pairs
            for name in resampled
        ]
    return {"stages": stages, "tasks": tasks, "settings": settings}


def _answers(results: Sequence[EvalResults]) -> dict[str, dict[str, list]]:
    """label -> task -> the answered items, in one pass (results of one label may hold different tasks)."""
    grouped: dict[str, dict[str, list]] = {}
    for result in results:
        for item in result.items:
            grouped.setdefault(result.label, {}).setdefault(item.task, []).append(item)
    return grouped


def change(entry: dict[str, Any], before: str, after: str, number: str | None = None) -> dict[str, Any] | None:
    """The change of a task's number (default: its main one) from stage `before` to `after`, if collected."""
    number = number or entry["primary"]
    return next((c for c in entry["changes"] if (c["from"], c["to"], c["number"]) == (before, after, number)), None)


# ---------------------------------------------------------------------------------------------------
# Plot


def plot_scores(table: dict[str, Any], path: Path, title: str) -> Path:
    """Grouped bars: each task's main number, one bar per stage, with its 95 % interval."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend needed

    stages, tasks = table["stages"], table["tasks"]
    names = list(tasks)
    width = 0.8 / len(stages)
    inches = min(16.0, max(6.0, 0.9 * len(names) * (0.6 + 0.2 * len(stages)) + 2))  # wide enough to read
    figure = Figure(figsize=(inches, 4.8), layout="constrained")
    axes = figure.subplots()
    colours = [f"C{i}" for i in range(len(stages))]
    tops = [100.0]
    for s, stage in enumerate(stages):
        positions, values, errors = [], [], [[], []]
        for t, task in enumerate(names):
            summary = tasks[task]["scores"].get(stage)
            if summary is not None:
                primary = tasks[task]["primary"]
                positions.append(t - 0.4 + width * (s + 0.5))
                values.append(summary[primary])
                low, high = tasks[task]["intervals"][stage][primary]
                tops.append(high)
                errors[0].append(values[-1] - low)
                errors[1].append(high - values[-1])
        whiskers = dict(elinewidth=0.8, capsize=1.5, ecolor="0.3")
        bars = axes.bar(
            positions, values, width=width * 0.92, label=stage, color=colours[s], yerr=errors, error_kw=whiskers
        )
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels([f"{name}\n{tasks[name]['primary']}" for name in names], fontsize=8)
    axes.set_ylabel("score, higher is better (%; CIDEr × 100)")
    axes.set_ylim(0, max(tops) * 1.12)
    axes.set_title(f"{title}\n(whiskers: 95 % intervals)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    if len(stages) > 1:
        axes.legend(title="stage", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------
# Markdown


def _number(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _cell(text: str, limit: int = 110) -> str:
    """Text safe in a markdown table cell: one line, `|` escaped, `<image>` visible, not too long."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _interval(bounds: Sequence[float] | None) -> str:
    return f" ({bounds[0]:.1f}–{bounds[1]:.1f})" if bounds is not None else ""


def _change(found: dict[str, Any] | None) -> str:
    """'+8.3 (-3.3, +21.7)': a change with its paired 95 % interval; '–' where there is none."""
    if found is None:
        return "–"
    low, high = found["ci95"]
    return f"{found['delta']:+.1f} ({low:+.1f}, {high:+.1f})"


def _breakdowns(entry: dict[str, Any], stages: Sequence[str], items: Sequence) -> list[str]:
    """A table per breakdown of a task (its categories, then each facet): the number per stage and the
    items behind it (counted on `items`, one stage's answers)."""
    number = CATEGORY_METRIC[entry["metric"]]
    scores = entry["scores"]
    tables = {"category": {stage: summary.get("by_category", {}) for stage, summary in scores.items()}}
    for facet in dict.fromkeys(f for summary in scores.values() for f in summary.get("by_facet", {})):
        tables[facet] = {stage: summary.get("by_facet", {}).get(facet, {}) for stage, summary in scores.items()}
    counts = {
        "category": Counter(item.details.get("category") for item in items),
        **{f: Counter(item.details.get("facets", {}).get(f) for item in items) for f in tables if f != "category"},
    }
    lines = []
    for name, by_stage in tables.items():
        values = list(dict.fromkeys(value for numbers in by_stage.values() for value in numbers))
        if not values:
            continue
        lines += ["", f"{number} by {name}:", ""]
        lines += [_row([name, "n", *stages]), _row(["---", "---:", *["---:"] * len(stages)])]
        for value in values:
            cells = [by_stage.get(stage, {}).get(value) for stage in stages]
            lines.append(
                _row([_cell(value), counts[name][value], *[_number(v) if v is not None else "–" for v in cells]])
            )
    return lines


def _markdown(table, results, title, plot_name, examples_per_task) -> str:
    stages, tasks = table["stages"], table["tasks"]
    answers = _answers(results)
    last_of = {task: [stage for stage in stages if stage in entry["scores"]][-1] for task, entry in tasks.items()}
    lines = [f"# {title}", ""]
    lines.append(
        f"{len(stages)} model{'s' if len(stages) > 1 else ''} ({', '.join(stages)}) on {len(tasks)} tasks. "
        "Scores are percentages (CIDEr: pycocoevalcap × 100); ↓ marks numbers where lower is better. "
        "In brackets: 95 % intervals (Wilson's for shares of right and wrong answers, else the bootstrap over "
        "the items); a change between two stages is bootstrapped in pairs, on the same items, and one whose "
        "interval holds 0 is no measured change."
    )
    lines += ["", "## Summary", ""]
    header = ["task", "metric", "n", *stages]
    if len(stages) > 1:
        header.append(f"Δ ({stages[-1]} − {stages[0]})")
    lines += [_row(header), _row(["---", "---", "---:", *["---:"] * (len(header) - 3)])]
    for task, entry in tasks.items():
        primary = entry["primary"]
        values = [entry["scores"].get(stage, {}).get(primary) for stage in stages]
        counts = {summary["n"] for summary in entry["scores"].values()}
        cells = [task, f"{METRIC_NAMES[entry['metric']]}: {primary}", "/".join(map(str, sorted(counts)))]
        cells += [_number(v) if v is not None else "–" for v in values]
        if len(stages) > 1:
            cells.append(_change(change(entry, stages[0], stages[-1])))
        lines.append(_row(cells))
    lines += ["", f"![main score per task and stage]({plot_name})", "", "## Tasks"]

    for task, entry in tasks.items():
        lines += ["", f"### {task}", ""]
        names = [k for k in next(iter(entry["scores"].values())) if k not in ("n", "by_category", "by_facet")]
        lines.append(_row(["stage", *[f"{n} ↓" if n in LOWER_IS_BETTER else n for n in names], "n"]))
        lines.append(_row(["---", *["---:"] * (len(names) + 1)]))
        for stage in stages:
            summary = entry["scores"].get(stage)
            if summary is not None:
                bounds = entry["intervals"][stage]
                cells = [_number(summary.get(n, "–")) + _interval(bounds.get(n)) for n in names]
                lines.append(_row([stage, *cells, summary["n"]]))
        steps = list(dict.fromkeys((c["from"], c["to"]) for c in entry["changes"]))
        resampled = list(dict.fromkeys(c["number"] for c in entry["changes"]))
        if steps:
            lines += ["", "change, paired on the same items:", ""]
            lines.append(_row(["from → to", *[f"Δ {n} ↓" if n in LOWER_IS_BETTER else f"Δ {n}" for n in resampled]]))
            lines.append(_row(["---", *["---:"] * len(resampled)]))
            for before, after in steps:
                lines.append(
                    _row([f"{before} → {after}", *[_change(change(entry, before, after, n)) for n in resampled]])
                )
        lines += _breakdowns(entry, stages, answers[last_of[task]][task])

    last = stages[-1]
    lines += ["", f"## Example answers ({last})", ""]
    for task in tasks:
        shown = answers[last].get(task, [])
        if not shown:
            continue
        lines += [
            f"**{task}**",
            "",
            _row(["score", "question", "reference", "answer"]),
            _row(["---", "---", "---", "---"]),
        ]
        for item in shown[:examples_per_task]:
            reference = _reference_text(item)
            lines.append(
                _row([_mark(item), _cell(item.prompt), _cell(reference, 60), _cell(item.prediction or "(empty)", 80)])
            )
        lines.append("")

    lines += ["## Settings", ""]
    lines += [_row(["stage", "benchmark", "mode", "shots", "items", "batch", "seconds"]), _row(["---"] * 7)]
    for stage, by_benchmark in table["settings"].items():
        for benchmark, s in by_benchmark.items():
            shots = s.get("shots") if s.get("shots") is not None else "–"
            lines.append(_row([stage, benchmark, s["mode"], shots, s["num_items"], s["batch_size"], s["seconds"]]))
    return "\n".join(lines) + "\n"


def _reference_text(item) -> str:
    if "target_box" in item.details:
        return "box " + ", ".join(f"{v:g}" for v in item.details["target_box"])
    if "safe" in item.details:
        return "answer (safe request)" if item.details["safe"] else "refuse (unsafe request)"
    if len(item.references) > 3:  # VQA's ten human answers, captions: the commonest few
        counts: dict[str, int] = {}
        for reference in item.references:
            counts[reference] = counts.get(reference, 0) + 1
        common = sorted(counts, key=lambda r: -counts[r])[:3]
        return " / ".join(common) + " …"
    return " / ".join(item.references)


def _mark(item) -> str:
    """✓ right, ✗ wrong, the number itself for partial credit (VQA, ANLS) and CIDEr."""
    if item.metric != "cider" and item.score in (0.0, 1.0):
        return "✓" if item.score == 1.0 else "✗"
    return f"{item.score:.2f}"
