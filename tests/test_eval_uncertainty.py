"""Intervals of scores: each number recomputed on all items is the reported one, known Wilson intervals,
and the paired comparison of two models on the same items."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.evaluation import uncertainty
from blip3.evaluation.items import EvalItem
from blip3.evaluation.runner import ItemResult, _item_result
from blip3.evaluation.scoring import score_task
from blip3.evaluation.uncertainty import interval, paired_change, statistic, wilson


def scored(items: list[EvalItem], predictions: list[str]):
    """The runner's per-item results and the task's summary, as `evaluate` makes them."""
    per_item, summary = score_task(items, predictions)
    return [_item_result(item, p, s) for item, p, s in zip(items, predictions, per_item)], summary


def every_number(results, summary) -> dict[str, tuple[float, float]]:
    """{number: (reported, recomputed on all items)} for the numbers that can be resampled."""
    everything = np.arange(len(results))[None]
    found = {}
    for name, value in summary.items():
        compute = statistic(results, name)
        if compute is not None:
            found[name] = (value, float(compute(everything)[0]))
    return found


def exact_match_items(n):
    return [EvalItem(id=f"q{i}", task="colour", metric="exact_match", prompt="?", references=["red"]) for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30))
def test_pope_numbers_recomputed_on_all_items_are_the_reported_ones(outcomes):
    items = [
        EvalItem(
            id=f"p{i}", task="pope", metric="pope", prompt="Is there a star?", references=["yes" if truth else "no"]
        )
        for i, (truth, _) in enumerate(outcomes)
    ]
    results, summary = scored(items, ["Yes." if said else "No, there is not." for _, said in outcomes])
    found = every_number(results, summary)
    assert set(found) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "hallucination_rate"}
    for name, (reported, recomputed) in found.items():
        assert recomputed == pytest.approx(reported), name


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30))
def test_refusal_rates_recomputed_on_all_items_are_the_reported_ones(requests):
    items = [
        EvalItem(id=f"r{i}", task="safety", metric="refusal", prompt="Help?", safe=safe)
        for i, (safe, _) in enumerate(requests)
    ]
    results, summary = scored(items, ["I'm sorry, I can't help with that." if r else "Sure." for _, r in requests])
    found = every_number(results, summary)
    assert set(found) == {"refusal_rate", "over_refusal_rate", "accuracy"}
    for name, (reported, recomputed) in found.items():
        assert recomputed == pytest.approx(reported), name


PHRASES = ("red circle", "blue star", "green square")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sets(st.sampled_from(PHRASES)), st.lists(st.sampled_from(PHRASES), max_size=4)),
        min_size=1,
        max_size=20,
    )
)
def test_chair_numbers_recomputed_on_all_items_are_the_reported_ones(captions):
    vocabulary = {phrase: phrase for phrase in PHRASES}
    items = [
        EvalItem(
            id=f"c{i}",
            task="caption",
            metric="cider",
            prompt="Describe.",
            references=["shapes"],
            objects=sorted(held),
            object_vocabulary=vocabulary,
        )  # fmt: skip
        for i, (held, _) in enumerate(captions)
    ]
    results, summary = scored(items, [" and ".join(f"a {name}" for name in named) for _, named in captions])
    found = every_number(results, summary)
    assert set(found) == {"cider", "chair_i", "chair_s", "object_recall", "objects_named"}
    for name, (reported, recomputed) in found.items():
        assert recomputed == pytest.approx(reported), name
    # CHAIR_s is a share of captions (Wilson's interval); CHAIR_i a ratio of mentions (the bootstrap)
    assert statistic(results, "chair_s").counts == (sum(bool(set(n) - h) for h, n in captions), len(captions))
    assert statistic(results, "chair_i").counts is None


def test_main_numbers_of_the_other_metrics_recomputed_on_all_items_are_the_reported_ones():
    cases = {
        "vqa_accuracy": (["two", "2", "three"], [["2"] * 2 + ["two"] * 8, ["2"] * 3 + ["3"] * 7, ["four"] * 10]),
        "anls": (["HELLO", "HELP", "x"], [["HELLO"], ["HELLO"], ["HELLO"]]),
        "cider": (
            ["a red square", "a blue circle on the left", "two shapes"],
            [["a red square", "a red box"], ["a blue circle at the left"], ["a green star and a red square"]],
        ),
        "exact_match": (["Red.", "blue", "red"], [["red"], ["red"], ["red"]]),
    }
    for metric, (predictions, references) in cases.items():
        items = [
            EvalItem(id=str(i), task=metric, metric=metric, prompt="?", references=r) for i, r in enumerate(references)
        ]
        results, summary = scored(items, predictions)
        found = every_number(results, summary)
        assert len(found) == 1, metric  # the main number alone
        ((reported, recomputed),) = found.values()
        assert recomputed == pytest.approx(reported), metric
    boxes = [EvalItem(id=str(i), task="grounding", metric="grounding", prompt="?", box=(0, 0, 1, 1)) for i in range(3)]
    results, summary = scored(boxes, ["[0, 0, 1, 1]", "[0.5, 0.5, 1, 1]", "somewhere"])
    assert every_number(results, summary) == {"acc@0.5": (pytest.approx(100 / 3), pytest.approx(100 / 3))}
    choices = [
        EvalItem(id=str(i), task="mmbench", metric="multiple_choice", prompt="?", references=["A"], choices=["x", "y"])
        for i in range(4)
    ]
    results, summary = scored(choices, ["A", "B", "(A) x", "no idea"])
    assert every_number(results, summary) == {"accuracy": (50.0, 50.0)}  # not `unparsed`: no resampled share


def test_wilson_intervals_have_their_known_values():
    assert wilson(0, 10) == pytest.approx([0.0, 27.75], abs=0.01)
    assert wilson(5, 10) == pytest.approx([23.66, 76.34], abs=0.01)
    assert wilson(28, 28) == pytest.approx([87.94, 100.0], abs=0.01)  # never "100–100" at a perfect score
    assert wilson(0, 0) == [0.0, 100.0]


def test_a_share_gets_the_wilson_interval_and_cider_the_bootstrap():
    results, _ = scored(exact_match_items(60), ["red"] * 33 + ["blue"] * 27)
    assert interval(results) == pytest.approx(wilson(33, 60))
    captions = [
        EvalItem(id=str(i), task="caption", metric="cider", prompt="?", references=[f"a red square number {i % 7}"])
        for i in range(40)
    ]
    results, summary = scored(captions, [f"a red square number {i % 5}" for i in range(40)])
    low, high = interval(results)
    assert low < summary["cider"] < high
    assert interval(results) == [low, high]  # seeded: the same interval every time
    with pytest.raises(ValueError, match="cannot be resampled"):
        interval(results, "n")


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=2, max_value=40), st.randoms(use_true_random=False))
def test_intervals_hold_the_estimate_and_narrow_as_the_items_multiply(n, rng):
    answers = [rng.choice(["red", "blue"]) for _ in range(n)]
    small, _ = scored(exact_match_items(n), answers)
    large, summary = scored(exact_match_items(4 * n), answers * 4)  # the same share, four times the items
    (low, high), (big_low, big_high) = interval(small), interval(large)
    assert low <= summary["accuracy"] <= high and big_low <= summary["accuracy"] <= big_high
    assert big_high - big_low < high - low


def test_a_paired_change_sees_what_two_separate_intervals_cannot():
    # 60 questions; the second model gets 6 more right and none wrong that the first got right.
    before, _ = scored(exact_match_items(60), ["red"] * 30 + ["blue"] * 30)
    after, _ = scored(exact_match_items(60), ["red"] * 36 + ["blue"] * 24)
    change = paired_change(before, after)
    assert change["delta"] == pytest.approx(10.0) and change["n"] == 60
    assert change["ci95"][0] > 0  # a measured improvement
    assert interval(before)[1] > interval(after)[0]  # while the two intervals overlap

    # Answers that differ on as many items but both ways are no change at all.
    mixed, _ = scored(exact_match_items(60), ["blue"] * 6 + ["red"] * 30 + ["blue"] * 24)
    assert paired_change(before, mixed)["delta"] == pytest.approx(0.0)
    assert paired_change(before, mixed)["ci95"][0] < 0 < paired_change(before, mixed)["ci95"][1]
    assert paired_change(before, before) == {"delta": 0.0, "ci95": [0.0, 0.0], "n": 60}


def test_a_paired_change_matches_items_by_id_and_compares_only_shared_ones():
    before, _ = scored(exact_match_items(20), ["red"] * 10 + ["blue"] * 10)
    after, _ = scored(exact_match_items(20), ["red"] * 15 + ["blue"] * 5)
    shuffled = list(after)
    random.Random(0).shuffle(shuffled)
    assert paired_change(before, shuffled)["delta"] == pytest.approx(paired_change(before, after)["delta"])
    assert paired_change(before, after[:12])["n"] == 12
    with pytest.raises(ValueError, match="share no items"):
        paired_change(before[:5], after[5:])
    with pytest.raises(ValueError, match="unique"):
        paired_change(before + before[:1], after)


def test_a_large_benchmark_is_resampled_in_chunks_with_the_same_answer_as_at_once(monkeypatch):
    rng = np.random.default_rng(0)
    vqa = [
        ItemResult(id=str(i), task="vqav2", metric="vqa_accuracy", prompt="?", prediction="", references=[], score=s)
        for i, s in enumerate(rng.choice([0.0, 0.3, 0.6, 1.0], size=50_000))
    ]  # VQA accuracy is no plain share: bootstrapped, 50,000 items in chunks of 80 resamples
    low, high = interval(vqa)
    scores = 100 * np.array([item.score for item in vqa])
    half_width = 1.959964 * scores.std() / np.sqrt(len(scores))  # the normal approximation, ±0.32 points here
    assert low < scores.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    # chunking changes nothing: 2,000 items resampled at once (one 1,000 × 2,000 draw) or 7 resamples at a time
    at_once = interval(vqa[:2000])
    monkeypatch.setattr(uncertainty, "CHUNK_INDICES", 7 * 2000)
    assert interval(vqa[:2000]) == at_once
