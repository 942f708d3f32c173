"""Evaluation: benchmarks read from their own files, scored exactly as their official scripts score them.

items.py     EvalItem, the one shape every benchmark is read into, and the metric kinds
metrics.py   the metrics themselves (VQA accuracy, CIDEr-D, ANLS, exact match, choice letters,
             POPE, grounding IoU, refusals), each with its source
scoring.py   a task's items + answers -> per-item scores and the task's summary
prompts.py   instruct prompts per benchmark; OpenFlamingo-style few-shot prompts for base models
adapters.py  VQAv2, OK-VQA, TextVQA, VizWiz, COCO, NoCaps, TextCaps, POPE, MMBench, SEED-Bench,
             ScienceQA, MMMU files -> EvalItems (and the registry `load_benchmark`)
synthetic.py blip3's synthetic world's evaluation files -> EvalItems
runner.py    evaluate(model, processor, items) -> EvalResults (batched greedy generation)
report.py    results of one or more models/stages -> report.md, report.json, scores.png
cli.py       `blip3 eval` and `blip3 eval-report`
"""

from blip3.evaluation.adapters import BENCHMARKS, load_benchmark
from blip3.evaluation.items import METRICS, EvalItem
from blip3.evaluation.runner import EvalResults, ItemResult, evaluate
from blip3.evaluation.scoring import PRIMARY_METRIC, score_task
from blip3.evaluation.synthetic import load_synthetic

__all__ = [
    "BENCHMARKS",
    "METRICS",
    "PRIMARY_METRIC",
    "EvalItem",
    "EvalResults",
    "ItemResult",
    "evaluate",
    "load_benchmark",
    "load_synthetic",
    "score_task",
]
