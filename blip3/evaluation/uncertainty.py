"""How sure a score is: bootstrap intervals for a task's numbers, alone and as a change between models.

    low, high = interval(items)                        # 95 % interval of one model's main number on one task
    change = paired_change(before_items, after_items)   # {"delta", "ci95", "n"}: the same items, two models
    change = paired_change(before, after, "hallucination_rate")

A benchmark of 60 questions measures an accuracy of 55 % to within about ±12 points, and two models
that score 55 and 63 on it may not differ at all; a report that prints only the numbers invites
reading noise as progress. A number that is a share of right / wrong outcomes (an accuracy of
exact matches, a refusal rate, POPE's yes-ratio) gets the Wilson score interval; any other (CIDEr,
VQA accuracy, ANLS, F1) the percentile bootstrap (Efron & Tibshirani 1993): the items are resampled
with replacement and the number recomputed on every resample. A change between two models is
bootstrapped in pairs (each resample takes the same items for both), which removes the items' own
difficulty from the comparison: the usual way to compare two systems on one test set (Koehn 2004).

The numbers are recomputed from the per-item results the runner stores (`ItemResult`):
- the main number (`scoring.PRIMARY_METRIC`) of accuracy, VQA accuracy, ANLS, grounding acc@0.5 and
  CIDEr is a mean of per-item scores (CIDEr's corpus score is the mean of the images' scores; the
  document frequencies are kept from the whole set, as is usual when resampling CIDEr);
- POPE's numbers (F1, accuracy, precision, recall, yes-ratio, hallucination rate) come from the
  resampled yes / no answers and labels;
- the refusal and over-refusal rates from the resampled unsafe and safe requests;
- CHAIR's numbers from the resampled captions' counts of objects named, named but not there, held
  and found (CHAIR_i and object recall are ratios of sums, so they are bootstrapped; CHAIR_s, a
  share of captions, gets the Wilson interval).
On all items each gives the task's reported number exactly (tested). Resamples are drawn from a
fixed seed, so a report is the same every time it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from blip3.evaluation.items import CIDER, POPE, REFUSAL
from blip3.evaluation.scoring import PRIMARY_METRIC

RESAMPLES = 1000
LEVEL = 0.95
CHUNK_INDICES = 4_000_000  # resampled item indices held at once (32 MB)


@dataclass(frozen=True)
class Statistic:
    """One of a task's numbers, recomputed on resampled items.

    compute: resample index matrix [resamples, n] -> the number on each resample [resamples], in percent.
    counts: (successes, trials) where the number is the share of yes / no outcomes among `trials` items
        (accuracy of right / wrong answers, a rate), which gets the Wilson interval; None otherwise.
    """

    compute: Callable[[np.ndarray], np.ndarray]
    counts: tuple[int, int] | None = None

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self.compute(indices)


def statistic(items: Sequence, number: str | None = None) -> Statistic | None:
    """A task's number as a function of resampled item indices (items: `ItemResult`s of one task).

    number: a name of the task's summary (default: its main number, `PRIMARY_METRIC`). Resampled are
    the main number of every metric, all of POPE's and CHAIR's numbers and both refusal rates; None for others.
    """
    if not items:
        raise ValueError("no items to resample")
    metrics = {item.metric for item in items}
    if len(metrics) != 1:
        raise ValueError(f"items of one task must share one metric, got {sorted(metrics)}")
    metric = metrics.pop()
    number = number or PRIMARY_METRIC[metric]
    if metric == POPE:
        if number not in _POPE_RATIOS:
            return None
        said_yes = np.array([item.details["answer"] == "yes" for item in items])
        is_yes = np.array([item.references[0].strip().lower() == "yes" for item in items])
        outcomes = {
            "tp": said_yes & is_yes,
            "fp": said_yes & ~is_yes,
            "tn": ~said_yes & ~is_yes,
            "fn": ~said_yes & is_yes,
        }

        def ratio_of(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _POPE_RATIOS[number]({name: flags[indices].sum(axis=-1) for name, flags in outcomes.items()})

        numerator, denominator = ratio_of(np.arange(len(items))[None])
        counts = None if number == "f1" else (int(numerator[0]), int(denominator[0]))  # F1 is no plain share
        return Statistic(lambda indices: 100.0 * _ratio(*ratio_of(indices)), counts)
    if metric == REFUSAL and number in ("refusal_rate", "over_refusal_rate"):
        asked = np.array([item.details["safe"] == (number == "over_refusal_rate") for item in items])
        declined = asked & np.array([bool(item.details["refused"]) for item in items])
        return Statistic(
            lambda indices: 100.0 * _ratio(declined[indices].sum(-1), asked[indices].sum(-1)),
            (int(declined.sum()), int(asked.sum())),
        )
    if metric == CIDER and number in _CHAIR_NUMBERS:
        if any("named" not in item.details for item in items):
            return None
        per_caption = {
            "named": [len(item.details["named"]) for item in items],
            "not_there": [len(item.details["not_there"]) for item in items],
            "flagged": [bool(item.details["not_there"]) for item in items],
            "held": [len(set(item.details["objects"])) for item in items],
            "found": [len(set(item.details["objects"]) & set(item.details["named"])) for item in items],
            "captions": [1] * len(items),
        }
        counts_of = {name: np.array(values, dtype=np.float64) for name, values in per_caption.items()}
        numerator, denominator = _CHAIR_NUMBERS[number]
        scale = 1.0 if number == "objects_named" else 100.0
        counts = (int(counts_of["flagged"].sum()), len(items)) if number == "chair_s" else None
        return Statistic(
            lambda indices: (
                scale * _ratio(counts_of[numerator][indices].sum(-1), counts_of[denominator][indices].sum(-1))
            ),
            counts,
        )
    if number != PRIMARY_METRIC[metric] and not (metric == REFUSAL and number == "accuracy"):
        return None
    scores = np.array([item.score for item in items], dtype=np.float64)
    binary = bool(np.isin(scores, (0.0, 1.0)).all())
    return Statistic(
        lambda indices: 100.0 * scores[indices].mean(axis=-1), (int(scores.sum()), len(scores)) if binary else None
    )


# POPE's numbers from the resampled counts: (numerator, denominator), as `metrics.pope_metrics`.
_POPE_RATIOS = {
    "accuracy": lambda n: (n["tp"] + n["tn"], n["tp"] + n["tn"] + n["fp"] + n["fn"]),
    "precision": lambda n: (n["tp"], n["tp"] + n["fp"]),
    "recall": lambda n: (n["tp"], n["tp"] + n["fn"]),
    "f1": lambda n: (2 * n["tp"], 2 * n["tp"] + n["fp"] + n["fn"]),  # = 2PR / (P + R)
    "yes_ratio": lambda n: (n["tp"] + n["fp"], n["tp"] + n["tn"] + n["fp"] + n["fn"]),
    "hallucination_rate": lambda n: (n["fp"], n["fp"] + n["tn"]),
}


# CHAIR's numbers as (numerator, denominator) sums over the captions, as `metrics.chair`.
_CHAIR_NUMBERS = {
    "chair_i": ("not_there", "named"),
    "chair_s": ("flagged", "captions"),
    "object_recall": ("found", "held"),
    "objects_named": ("named", "captions"),
}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (an undefined rate, as `metrics` counts it)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _required(items: Sequence, number: str | None) -> Statistic:
    compute = statistic(items, number)
    if compute is None:
        raise ValueError(f"{number!r} of task {items[0].task!r} ({items[0].metric}) cannot be resampled")
    return compute


def _resampled(statistics: Sequence[Statistic], n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """Each statistic on the same `resamples` draws of n items with replacement ([resamples] each).

    Drawn in chunks of at most CHUNK_INDICES indices, so that a benchmark of 200,000 questions needs
    tens of MB, not the 1.6 GB of one index matrix; consecutive draws from one generator are the same
    numbers as one large draw, so the chunking does not change the result.
    """
    rng = np.random.default_rng(seed)
    per_chunk = max(1, min(resamples, CHUNK_INDICES // max(n, 1)))
    values: list[list[np.ndarray]] = [[] for _ in statistics]
    for start in range(0, resamples, per_chunk):
        indices = rng.integers(0, n, size=(min(per_chunk, resamples - start), n))
        for collected, compute in zip(values, statistics):
            collected.append(compute(indices))
    return [np.concatenate(collected) for collected in values]


def _percentiles(values: np.ndarray) -> list[float]:
    tail = 100.0 * (1.0 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def interval(items: Sequence, number: str | None = None, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """[low, high]: the 95 % interval of a task's number (default: its main one).

    A share of yes / no outcomes gets the Wilson score interval, which stays honest at 0 or 100 % (all 28
    unsafe requests refused: 87.9–100, where the bootstrap would say 100–100); any other number the
    percentile bootstrap.
    """
    compute = _required(items, number)
    if compute.counts is not None:
        return wilson(*compute.counts)
    (values,) = _resampled([compute], len(items), resamples, seed)
    return _percentiles(values)


def wilson(successes: int, trials: int, z: float = 1.959964) -> list[float]:
    """The Wilson score interval of a binomial share, in percent (Wilson 1927); [0, 100] for no trials."""
    if trials == 0:
        return [0.0, 100.0]
    share = successes / trials
    centre = (share + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z * np.sqrt(share * (1 - share) / trials + z**2 / (4 * trials**2)) / (1 + z**2 / trials)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not 1 − 1e-16
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return [100.0 * float(low), 100.0 * float(high)]


def paired_change(
    before: Sequence, after: Sequence, number: str | None = None, resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """The change of a task's number (default: its main one) from `before` to `after`, on the items
    both answered (matched by id).

    Returns {"delta": after − before on those items, "ci95": its 95 % interval [low, high], "n": how many}.
    """
    by_id = {item.id: item for item in before}
    if len(by_id) != len(before) or len({item.id for item in after}) != len(after):
        raise ValueError("item ids must be unique within a task to pair two models' answers")
    shared = [item.id for item in after if item.id in by_id]
    if not shared:
        raise ValueError("the two results share no items: nothing to compare")
    after_by_id = {item.id: item for item in after}
    statistic_before = _required([by_id[i] for i in shared], number)
    statistic_after = _required([after_by_id[i] for i in shared], number)
    everything = np.arange(len(shared))[None]
    delta = float(statistic_after(everything)[0] - statistic_before(everything)[0])
    before_values, after_values = _resampled([statistic_before, statistic_after], len(shared), resamples, seed)
    return {"delta": delta, "ci95": _percentiles(after_values - before_values), "n": len(shared)}
