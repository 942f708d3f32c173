"""The demo end to end in its smoke profile: world, stage 0, every training stage, evaluation, report."""

from __future__ import annotations

import json

from blip3.demo import EVALUATED, STAGES, run_demo


def test_smoke_demo_runs_every_stage_and_writes_the_report(tmp_path):
    summary = run_demo(tmp_path, profile_name="smoke")
    assert list(summary) == list(EVALUATED)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["stages"] == list(EVALUATED)
    for task in ("colour", "count", "ocr_small", "grounding", "multi_which", "pope", "safety"):
        assert set(report["tasks"][task]["scores"]) == set(EVALUATED), task
    assert (tmp_path / "report" / "scores.png").stat().st_size > 10_000
    assert "| task |" in (tmp_path / "report" / "report.md").read_text()
    for stage in STAGES:
        assert (tmp_path / "stages" / stage / "loss.png").is_file(), stage
    timings = json.loads((tmp_path / "report" / "timings.json").read_text())
    assert {"world", "stage0", *STAGES} <= set(timings)
