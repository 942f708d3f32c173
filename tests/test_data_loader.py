"""The loader: a malformed corpus read to the end with every item accounted for, determinism, exact
resume (with and without workers), rank splitting, mixture weights, epochs, options and configs."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3.data import DataCounts, Mixture, build_loader
from blip3.data.testing import png_bytes, write_caption_shards, write_jsonl, write_malformed_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_malformed_corpus(tmp_path_factory.mktemp("corpus"))


def loader_for(corpus, processor, **settings):
    settings = {"batch_size": 3, "max_length": corpus.max_length, **settings}
    return build_loader(corpus.mixture, processor, **settings)


def take(loader, n: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for index, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), index
        for name in x:
            same = torch.equal(x[name], y[name]) if isinstance(x[name], torch.Tensor) else x[name] == y[name]
            assert same, (index, name)


def used_keys(batches: list[dict]) -> list[str]:
    return sorted(key for batch in batches for key in batch["sample_keys"])


# ---------------------------------------------------------------------------------------------------
# The malformed corpus


@pytest.mark.parametrize("overlong", ["drop_turns", "skip"])
def test_malformed_corpus_every_item_accounted_for(corpus, processor, overlong):
    assert corpus.num_bad >= 30
    reasons = {reason for by_reason in corpus.bad.values() for reason in by_reason}
    assert len(reasons) >= 14  # the corpus exercises most skip reasons, not one reason many times
    loader = loader_for(corpus, processor, epochs=1, overlong=overlong)
    batches = list(loader)  # completes: no bad item ends the run
    assert used_keys(batches) == corpus.expected_used(overlong)  # every good item, each exactly once
    assert loader.counts.skipped == corpus.expected_skipped(overlong)  # every bad item under its reason
    assert sum(loader.used.values()) == len(corpus.expected_used(overlong))
    expected_truncated = {s: len(keys) for s, keys in corpus.truncatable.items()} if overlong == "drop_turns" else {}
    assert loader.truncated == expected_truncated
    assert "unexpected_error" not in loader.skipped


def test_corpus_split_over_ranks_and_workers(corpus, processor):
    """2 ranks × 2 streams (2 workers each): shards split across streams where there are enough (captions),
    rows where there are not (the other sources); together they read everything once, count every bad once."""
    batches, counts = [], []
    for rank in range(2):
        loader = loader_for(corpus, processor, epochs=1, rank=rank, world_size=2, num_workers=2, length_grouping=2)
        batches += list(loader)
        counts.append(loader.counts)
    keys = used_keys(batches)
    assert keys == corpus.expected_used() and len(set(keys)) == len(keys)
    assert DataCounts.merge(counts).skipped == corpus.expected_skipped()
    assert DataCounts.merge([c.to_dict() for c in counts]).used == DataCounts.merge(counts).used  # dicts merge too


# ---------------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_seed_same_batches(corpus, processor):
    first = take(loader_for(corpus, processor, seed=3), 12)
    assert_same_batches(first, take(loader_for(corpus, processor, seed=3), 12))
    other = take(loader_for(corpus, processor, seed=4), 12)
    assert [b["sample_keys"] for b in first] != [b["sample_keys"] for b in other]


def test_workers_do_not_change_the_batches(corpus, processor):
    settings = {"streams_per_rank": 2, "seed": 1, "length_grouping": 2}
    reference = take(loader_for(corpus, processor, num_workers=0, **settings), 14)
    assert_same_batches(reference, take(loader_for(corpus, processor, num_workers=2, **settings), 14))
    assert_same_batches(reference, take(loader_for(corpus, processor, num_workers=1, **settings), 14))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(corpus, processor, num_workers):
    """Consume k batches, save, rebuild, load: the next batches are bit-identical to an uninterrupted run's,
    also in the middle of a length group and across epochs of the small sources."""
    settings = {"num_workers": num_workers, "streams_per_rank": 2, "seed": 7, "length_grouping": 3}
    total = 20
    reference = take(loader_for(corpus, processor, **settings), total)
    for consumed in (0, 5, 13):
        interrupted = loader_for(corpus, processor, **settings)
        take(interrupted, consumed)
        state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
        resumed = loader_for(corpus, processor, **settings)
        resumed.load_state_dict(state)
        assert resumed.counts.to_dict() == interrupted.counts.to_dict()
        assert_same_batches(take(resumed, total - consumed), reference[consumed:])
        assert resumed.batches_yielded == total


def test_resume_with_another_number_of_workers(corpus, processor):
    settings = {"streams_per_rank": 2, "seed": 2}
    reference = take(loader_for(corpus, processor, num_workers=0, **settings), 12)
    interrupted = loader_for(corpus, processor, num_workers=2, **settings)
    take(interrupted, 5)
    resumed = loader_for(corpus, processor, num_workers=0, **settings)
    resumed.load_state_dict(interrupted.state_dict())
    assert_same_batches(take(resumed, 7), reference[5:])


def test_resume_finite_run_reads_the_rest_once(corpus, processor):
    interrupted = loader_for(corpus, processor, epochs=1, streams_per_rank=2, num_workers=2)
    first = take(interrupted, 4)
    resumed = loader_for(corpus, processor, epochs=1, streams_per_rank=2)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert used_keys(first + rest) == corpus.expected_used()
    assert resumed.counts.skipped == corpus.expected_skipped()


def test_a_new_iteration_continues_after_the_last_batch_taken(corpus, processor):
    reference = take(loader_for(corpus, processor, seed=5), 8)
    loader = loader_for(corpus, processor, seed=5)
    first = take(loader, 3)  # its iterator is dropped with prefetched batches in it
    assert_same_batches(first + take(loader, 5), reference)


def test_state_of_other_settings_is_refused(corpus, processor):
    loader = loader_for(corpus, processor, seed=1)
    take(loader, 2)
    with pytest.raises(ValueError, match="batch_size"):
        loader_for(corpus, processor, seed=1, batch_size=4).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="seed"):
        loader_for(corpus, processor, seed=2).load_state_dict(loader.state_dict())


# ---------------------------------------------------------------------------------------------------
# Mixture weights, epochs, options


def _text_source(path: Path, name: str, count: int) -> dict:
    rows = [
        {"conversations": [{"from": "human", "value": f"{name} question {i}"}, {"from": "gpt", "value": "answer"}]}
        for i in range(count)
    ]
    write_jsonl(path / f"{name}.jsonl", rows)
    return {"name": name, "type": "jsonl", "path": str(path / f"{name}.jsonl"), "format": "conversation"}


def test_mixture_weights_are_respected(tmp_path, processor):
    mixture = {
        "sources": [
            {**_text_source(tmp_path, "major", 40), "weight": 3},
            {**_text_source(tmp_path, "minor", 40), "weight": 1},
        ]
    }
    loader = build_loader(mixture, processor, batch_size=50, seed=0, streams_per_rank=2)
    take(loader, 40)
    used = loader.used
    fraction = used["major"] / (used["major"] + used["minor"])
    # 2000 draws with p = 0.75: σ ≈ 0.0097; the bound is 4σ (the draw is seeded, so this is not flaky)
    assert abs(fraction - 0.75) < 0.04
    assert loader.epochs_completed["major"] >= 10  # the small sources went round many times


def test_epochs_read_everything_that_many_times(tmp_path, processor):
    mixture = [_text_source(tmp_path, "a", 7), _text_source(tmp_path, "b", 5)]
    loader = build_loader(mixture, processor, batch_size=4, epochs=2, streams_per_rank=2)
    counts = collections.Counter(key for batch in loader for key in batch["sample_keys"])
    assert len(counts) == 12 and set(counts.values()) == {2}
    assert loader.epochs_completed == {"a": 2, "b": 2}


def test_drop_last_counts_the_dropped_samples(tmp_path, processor):
    loader = build_loader([_text_source(tmp_path, "a", 7)], processor, batch_size=3, epochs=1, drop_last=True)
    assert [len(b["sample_keys"]) for b in loader] == [3, 3]
    assert loader.skipped == {"incomplete_batch": 1}


def test_source_options_override_loader_settings(tmp_path, processor):
    write_caption_shards(tmp_path / "shards", 1, 4)
    source = {"name": "c", "type": "webdataset", "path": str(tmp_path / "shards"), "format": "caption"}
    many = [{"from": "human", "value": "<image>" * 5 + "Which differs?"}, {"from": "gpt", "value": "The third."}]
    images = tmp_path / "img"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.png").write_bytes(png_bytes(np.random.default_rng(i)))
    write_jsonl(tmp_path / "many.jsonl", [{"image": [f"img/{i}.png" for i in range(5)], "conversations": many}])
    conversation = {"name": "m", "type": "jsonl", "path": str(tmp_path / "many.jsonl"), "format": "conversation"}
    default = build_loader([source, conversation], processor, batch_size=8, epochs=1)
    list(default)
    assert default.skipped == {"too_many_images": 1}
    raised = build_loader([source, {**conversation, "options": {"max_images": 6}}], processor, batch_size=8, epochs=1)
    batches = list(raised)
    assert raised.skipped == {} and sum(b["num_images"].tolist().count(5) for b in batches) == 1


def test_length_grouping_reduces_padding(tmp_path, processor):
    rows = [
        {"conversations": [{"from": "human", "value": "q " * (1 + (i * 37) % 60)}, {"from": "gpt", "value": "a"}]}
        for i in range(64)
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    mixture = [{"name": "t", "type": "jsonl", "path": str(tmp_path / "t.jsonl"), "format": "conversation"}]

    def padding(length_grouping) -> int:
        batches = list(build_loader(mixture, processor, batch_size=4, epochs=1, length_grouping=length_grouping))
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(8) < padding(False) / 3


def test_unexpected_errors_are_counted_and_the_run_goes_on(corpus, processor, monkeypatch):
    from blip3.data import formats

    original = formats.interleaved_text

    def fragile(segments, eos_token):
        if len(segments) == 2:
            raise RuntimeError("a bug in a formatter")
        return original(segments, eos_token)

    monkeypatch.setattr(formats, "interleaved_text", fragile)
    loader = loader_for(corpus, processor, epochs=1)
    list(loader)
    assert loader.skipped["unexpected_error"] >= 1


def test_preference_loader(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png_bytes(np.random.default_rng(0)))
    pairs = [
        {
            "id": i,
            "images": ["a.png"],
            "prompt": "<image>\nWhat?",
            "chosen": "A circle.",
            "rejected": "A dog " * (i + 1),
        }
        for i in range(5)
    ]
    write_jsonl(tmp_path / "prefs.jsonl", pairs + [{"id": 9, "prompt": "?", "chosen": "A"}])
    mixture = [{"name": "p", "type": "jsonl", "path": str(tmp_path / "prefs.jsonl"), "format": "preference"}]
    loader = build_loader(mixture, processor, batch_size=2, epochs=1)
    batches = list(loader)
    assert sum(len(b["sample_keys"]) for b in batches) == 5 and loader.skipped == {"missing_field": 1}
    chosen, rejected = batches[0]["chosen"], batches[0]["rejected"]
    assert torch.equal(chosen["pixel_values"], rejected["pixel_values"])
    for row, prompt_length in enumerate(batches[0]["prompt_lengths"].tolist()):
        assert torch.equal(chosen["input_ids"][row, :prompt_length], rejected["input_ids"][row, :prompt_length])
        assert (chosen["labels"][row, :prompt_length] == -100).all()


# ---------------------------------------------------------------------------------------------------
# Mixture configs


def test_mixture_yaml_resolves_paths_relative_to_itself(tmp_path, processor):
    write_caption_shards(tmp_path / "data", 2, 3)
    (tmp_path / "mix.yaml").write_text(
        "sources:\n  - {name: c, type: webdataset, path: 'data/shard-{000..001}.tar', format: caption, weight: 2}\n"
    )
    loader = build_loader(tmp_path / "mix.yaml", processor, batch_size=2, epochs=1)
    assert sum(len(b["sample_keys"]) for b in loader) == 6


def test_paper_pretraining_mixture_weights():
    mixture = Mixture.from_yaml(Path(__file__).parents[1] / "configs" / "data" / "xgen-mm-pretrain.yaml")
    weights = dict(zip((s.name for s in mixture.sources), mixture.weights))
    assert sum(weights[name] for name in weights if name.startswith("mint1t")) == pytest.approx(0.325)
    assert weights["mint1t-html"] / weights["mint1t-arxiv"] == pytest.approx(7) and weights["mint1t-pdf"] / weights[
        "mint1t-arxiv"
    ] == pytest.approx(5)
    expected = {
        "obelics": 0.175,
        "blip3-kale": 0.25,
        "datacomp-1b": 0.10,
        "blip3-ocr-200m": 0.05,
        "blip3-grounding-50m": 0.05,
    }
    expected |= {name: 0.0125 for name in ("cc12m", "cc3m", "sbu", "visual-genome")}
    for name, weight in expected.items():
        assert weights[name] == pytest.approx(weight), name
    formats = {s.name: s.format for s in mixture.sources}
    assert (
        formats["obelics"] == "interleaved"
        and formats["blip3-ocr-200m"] == "ocr"
        and formats["blip3-grounding-50m"] == "grounding"
    )


@pytest.mark.parametrize(
    "sources, message",
    [
        ([{"name": "a", "type": "tar", "path": "x", "format": "caption"}], "type"),
        ([{"name": "a", "type": "jsonl", "path": "x", "format": "video"}], "format"),
        ([{"name": "a", "type": "jsonl", "path": "x", "format": "caption", "weight": 0}], "weight"),
        ([{"name": "a", "type": "jsonl", "path": "x", "format": "caption", "colour": 1}], "unknown keys"),
        ([{"name": "a", "type": "jsonl", "format": "caption"}], "lacks"),
        ([{"name": "a:b", "type": "jsonl", "path": "x", "format": "caption"}], "name"),
        ([{"name": "a", "type": "jsonl", "path": "x", "format": "caption"}] * 2, "unique"),
        (
            [
                {"name": "a", "type": "jsonl", "path": "x", "format": "caption"},
                {"name": "b", "type": "jsonl", "path": "x", "format": "preference"},
            ],
            "preference",
        ),
    ],
)
def test_invalid_mixtures_are_refused(sources, message):
    with pytest.raises(ValueError, match=message):
        Mixture.from_dict({"sources": sources})


def test_missing_files_and_bad_options_fail_at_build(tmp_path, processor):
    with pytest.raises(ValueError, match="no .tar"):
        build_loader(
            [{"name": "a", "type": "webdataset", "path": str(tmp_path / "none.tar"), "format": "caption"}],
            processor,
            batch_size=1,
        )
    write_caption_shards(tmp_path, 1, 1)
    source = {
        "name": "a",
        "type": "webdataset",
        "path": str(tmp_path),
        "format": "caption",
        "options": {"granularity": 1},
    }
    with pytest.raises(ValueError, match="unknown options"):
        build_loader([source], processor, batch_size=1)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        build_loader([{**source, "options": {}}], processor, batch_size=1, num_workers=2, streams_per_rank=3)
