"""The demo end to end in its smoke profile: world, stage 0, every training stage, evaluation, report."""

from __future__ import annotations

import json
from dataclasses import replace

from blip3.demo import EVALUATED, PROFILES, STAGES, WITH_TAGS, DemoPaths, run_demo, stage_config


def test_smoke_demo_runs_every_stage_and_writes_the_report(tmp_path):
    summary = run_demo(tmp_path, profile_name="smoke", stages=WITH_TAGS)  # every stage, the optional one too
    assert list(summary) == list(EVALUATED)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["stages"] == list(EVALUATED)
    for task in ("colour", "count", "ocr_small", "grounding", "multi_which", "pope", "safety"):
        assert set(report["tasks"][task]["scores"]) == set(EVALUATED), task
    # POPE is asked in full, all three categories; the other tasks up to the profile's limit per task
    paths, profile = DemoPaths(tmp_path), PROFILES["smoke"]
    pope = json.loads((tmp_path / "world" / "eval" / "test" / "pope.json").read_text())
    asked = json.loads((tmp_path / "report" / "sft.json").read_text())["items"]
    assert sum(item["task"] == "pope" for item in asked) == len(pope) == 12 > profile.eval_limit_per_task
    assert sum(item["task"] == "colour" for item in asked) == profile.eval_limit_per_task
    assert (tmp_path / "report" / "scores.png").stat().st_size > 10_000
    assert "| task |" in (tmp_path / "report" / "report.md").read_text()
    for stage in WITH_TAGS:
        assert (tmp_path / "stages" / stage / "loss.png").is_file(), stage
    timings = json.loads((tmp_path / "report" / "timings.json").read_text())
    assert {"world", "stage0", *WITH_TAGS} <= set(timings)
    # each stage starts from the one before it in the run: SFT from the tags stage here, from pre-training without it
    assert stage_config("sft", paths, profile, 0, WITH_TAGS).model.init == str(paths.final_checkpoint("tags"))
    assert stage_config("sft", paths, profile, 0, STAGES).model.init == str(paths.final_checkpoint("pretrain"))
    assert stage_config("tags", paths, profile, 0, WITH_TAGS).data.mixture == str(tmp_path / "world" / "tags.yaml")


def test_a_resumed_demo_keeps_finished_stages_and_trains_again_from_the_first_changed_recipe(tmp_path, monkeypatch):
    stages = ("pretrain", "sft", "multi", "dpo")
    before = run_demo(tmp_path, profile_name="smoke", stages=stages)
    paths = DemoPaths(tmp_path)

    def trained() -> dict[str, float]:  # when each stage's final checkpoint (and stage 0's tower) was written
        times = {stage: paths.final_checkpoint(stage).stat().st_mtime_ns for stage in stages}
        return {**times, "stage0": (tmp_path / "stage0" / "metrics.json").stat().st_mtime_ns}

    first = trained()
    assert run_demo(tmp_path, profile_name="smoke", stages=stages, resume=True) == before  # evaluated again
    assert trained() == first  # but nothing trained again
    # a longer multi-image SFT: that stage and DPO after it train again, the ones before are kept
    smoke = PROFILES["smoke"]
    recipes = {**smoke.recipes, "multi": ["train.steps=3", "data.micro_batch_size=2"]}
    monkeypatch.setitem(PROFILES, "smoke", replace(smoke, recipes=recipes))
    run_demo(tmp_path, profile_name="smoke", stages=stages, resume=True)
    again = trained()
    assert {stage for stage in again if again[stage] != first[stage]} == {"multi", "dpo"}
    assert paths.final_checkpoint("multi").name == "step-000003"
    # without --resume every stage trains again
    run_demo(tmp_path, profile_name="smoke", stages=stages)
    assert all(value != again[key] for key, value in trained().items())
