"""`blip3 ablate anyres` in the smoke profile: one shared world and tower, one model per vision-token mode."""

from __future__ import annotations

import json

import pytest

from blip3.ablation import run_anyres_ablation
from blip3.cli import main


def test_the_anyres_ablation_trains_every_mode_on_the_same_world_and_reports_them_side_by_side(tmp_path, capsys):
    main(["ablate", "anyres", "--profile", "smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["stages"] == ["base", "anyres-fixed", "anyres-patch"]
    assert set(report["tasks"]["ocr_small"]["scores"]) == set(report["stages"])
    configs = {mode: json.loads((tmp_path / mode / "init" / "config.json").read_text()) for mode in report["stages"]}
    assert {mode: c["vision_token_mode"] for mode, c in configs.items()} == {m: m for m in report["stages"]}
    assert not (tmp_path / "base" / "world").exists()  # the world and stage 0 are shared, not rebuilt per mode
    for mode in report["stages"]:
        assert (tmp_path / mode / "stages" / "sft" / "loss.png").is_file()
    assert "ocr_small" in capsys.readouterr().out
    # a shared folder whose world was built for other settings (another seed, `demo --tags`) is an error, and its
    # world is left as it was
    manifest = (tmp_path / "world" / "manifest.json").read_text()
    with pytest.raises(ValueError, match="another seed or other sizes"):
        run_anyres_ablation(tmp_path / "other", profile_name="smoke", seed=1, modes=("base",), shared=tmp_path)
    assert (tmp_path / "world" / "manifest.json").read_text() == manifest
    assert not (tmp_path / "other" / "base").exists()
