"""Stage 0: tile captions, the SigLIP training loop, and the tower's hand-over to the VLM."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipVisionModel

from blip3 import Blip3ForConditionalGeneration
from blip3.cli import main
from blip3.processing import anyres
from blip3.synthetic.config import tiny_world_config
from blip3.synthetic.stage0 import (
    Stage0Settings,
    ViewSet,
    _batch,
    build_optimizer,
    build_siglip,
    caption_of_region,
    load_vision_tower,
    sincos_2d,
    text_tiles,
    tile_regions,
    tokenize_captions,
    train_stage0,
)
from blip3.synthetic.tokenizer import load_world_tokenizer
from blip3.synthetic.write import WorldSizes, build_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tile_regions_tile_the_image_row_major():
    plan = anyres.plan_anyres((112, 56), anyres.XGENMM_GRIDS, 56)
    assert plan.grid == (2, 1) and plan.offset == (0, 0)
    assert tile_regions(plan) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    plan = anyres.plan_anyres((112, 112), anyres.XGENMM_GRIDS, 56)
    assert tile_regions(plan)[3] == (0.5, 0.5, 1.0, 1.0)


def test_a_region_caption_names_the_shapes_centred_in_it_and_only_whole_text():
    scene = {
        "objects": [
            {"kind": "circle", "colour": "red", "position": "top left", "box": [0.05, 0.05, 0.25, 0.25]},
            {"kind": "star", "colour": "blue", "position": "middle", "box": [0.4, 0.4, 0.58, 0.58]},  # centre 0.49
            {"kind": "cross", "colour": "green", "position": "bottom right", "box": [0.7, 0.7, 0.9, 0.9]},
        ],
        "texts": [
            {"text": "KMN", "size": "small", "position": "top right", "box": [0.6, 0.1, 0.8, 0.2]},
            {"text": "PLAX", "size": "large", "position": "bottom", "box": [0.3, 0.8, 0.7, 0.9]},  # cut in two
        ],
    }
    assert caption_of_region(scene, (0.0, 0.0, 0.5, 0.5)) == "A red circle and a blue star."
    assert caption_of_region(scene, (0.5, 0.0, 1.0, 0.5)) == 'The text "KMN".'
    assert caption_of_region(scene, (0.5, 0.5, 1.0, 1.0)) == "A green cross."
    assert caption_of_region(scene, (0.0, 0.5, 0.5, 1.0)) is None  # only half of "PLAX" is there


def test_text_tiles_are_the_tiles_holding_one_whole_string():
    image = Image.new("RGB", (168, 56), "white")  # a 3×1 grid of 56-px tiles
    texts = [
        {"text": "YAK", "box": [0.05, 0.3, 0.28, 0.6]},  # inside the first tile
        {"text": "ACE", "box": [0.30, 0.3, 0.40, 0.6]},  # cut by the edge between the first two
        {"text": "ELK", "box": [0.70, 0.3, 0.95, 0.6]},  # inside the third
    ]
    views = text_tiles([(image, texts)], 56, anyres.XGENMM_GRIDS)
    assert views.captions == ['The text "YAK".', 'The text "ELK".']
    assert views.pixels.shape == (2, 56, 56, 3)


def test_a_batch_takes_its_shares_from_each_pool_and_no_caption_twice():
    def pool(prefix, n):
        return ViewSet(np.zeros((n, 4, 4, 3), np.uint8), [f"{prefix} {i % (n // 2)}." for i in range(n)])

    pools = (pool("text", 20), pool("tile", 200), pool("global", 200))  # every caption twice
    settings = Stage0Settings(batch_size=40, text_share=0.5, tile_share=0.25)
    pixels, captions = _batch(random.Random(0), pools, settings)
    assert len(captions) == len(set(captions)) == len(pixels)
    kinds = [c.split()[0] for c in captions]
    # 20 text tiles wanted but only 10 distinct captions exist; then 5 tiles and 15 global views
    assert (kinds.count("text"), kinds.count("tile"), kinds.count("global")) == (10, 5, 15)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke world and a few stage-0 steps on a narrow tower (seconds)."""
    root = tmp_path_factory.mktemp("stage0")
    build_world(root / "world", WorldSizes.smoke(), seed=0, workers=1, progress=False)
    tokenizer = load_world_tokenizer(root / "world")
    config = tiny_world_config(tokenizer, vision_width=32, vision_layers=1, vision_heads=2)
    settings = Stage0Settings(steps=12, batch_size=16, warmup_steps=2, text_width=32, text_layers=1, log_every=1)
    metrics = train_stage0(root / "world", root / "out", settings, config=config, progress=False)
    return root, config, metrics


def test_the_tower_starts_with_2d_sincos_positions_at_the_patches_scale(trained):
    root, config, _ = trained
    codes = sincos_2d(7, 96)
    assert codes.shape == (49, 96)
    assert torch.allclose(codes.norm(dim=1), torch.full((49,), 48**0.5), atol=1e-5)  # sin² + cos² per frequency
    assert torch.cdist(codes, codes).add(torch.eye(49)).min() > 0.5  # every patch's code is its own
    # row-major like the patches: the first half of the channels follows the row, the second the column
    assert torch.equal(codes[1, :48], codes[0, :48]) and not torch.equal(codes[7, :48], codes[0, :48])
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(7, 30)
    model = build_siglip(config.vision_config, load_world_tokenizer(root / "world"), Stage0Settings())
    grid = config.vision_config.image_size // config.vision_config.patch_size
    expected = sincos_2d(grid, config.vision_config.hidden_size)
    assert torch.equal(model.vision_model.embeddings.position_embedding.weight, expected)


def test_stage0_lowers_the_sigmoid_loss_and_logs_it(trained):
    root, _, metrics = trained
    log = [json.loads(line) for line in (root / "out" / "stage0_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert log[-1]["retrieval"] == metrics["retrieval"]
    retrieval = metrics["retrieval"]
    assert 0 <= retrieval["top1"] <= retrieval["top5"] <= 1 and retrieval["num_images"] == 16
    assert metrics["train_views"]["tiles"] > metrics["train_views"]["global"]  # every image adds 2-4 tiles
    assert metrics["train_views"]["text_tiles"] > 0  # from the OCR pre-training images
    for probe in (metrics["patch_probe"], metrics["patch_probe_before"]):
        assert 0 <= probe["colour"] <= 1 and 0 <= probe["shape"] <= 1 and probe["test_objects"] > 0
    for reads in (metrics["text_retrieval"], metrics["text_retrieval_before"]):  # the smoke world has 10 text tiles
        assert 0 <= reads["top1"] <= reads["top5"] <= 1 and reads["num_images"] == 10
    for when in ("", "_before"):  # per text size, against all the strings: the sizes' tiles add up to the whole
        overall, by_size = metrics[f"text_retrieval{when}"], metrics[f"text_retrieval_by_size{when}"]
        assert set(by_size) <= {"small", "large"} and by_size
        assert sum(r["num_images"] for r in by_size.values()) == overall["num_images"]
        assert all(r["num_captions"] == overall["num_captions"] for r in by_size.values())
        hits = sum(r["top1"] * r["num_images"] for r in by_size.values())
        assert hits == pytest.approx(overall["top1"] * overall["num_images"])


def test_the_stage0_tower_loads_into_the_vlm_and_gives_its_features(trained):
    root, config, _ = trained
    tower = SiglipVisionModel.from_pretrained(root / "out" / "vision_tower")
    model = Blip3ForConditionalGeneration(config)
    load_vision_tower(model, root / "out" / "vision_tower")
    ours = model.model.vision_tower.state_dict()
    assert ours.keys() == tower.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in tower.state_dict().items())
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    pixels = torch.randn(3, 3, config.image_size, config.image_size)
    expected = tower(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(model.model.encode_tiles(pixels), expected)

    wider = Blip3ForConditionalGeneration(tiny_world_config(load_world_tokenizer(root / "world"), vision_width=64))
    with pytest.raises(ValueError, match="hidden_size"):
        load_vision_tower(wider, root / "out" / "vision_tower")


def test_the_stage0_command_trains_and_reports(trained, tmp_path, capsys):
    root, _, _ = trained
    main(["stage0", str(root / "world"), "--out", str(tmp_path), "--steps", "3", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "image->caption top-1" in out and "patch probe" in out and "text tiles -> their string" in out
    assert re.search(r"text tiles -> their string top-1 [\d.]+% .*; (small|large) text [\d.]+%", out)
    assert (tmp_path / "vision_tower" / "config.json").is_file()


def test_caption_tokens_are_padded_and_the_padding_masked(trained):
    tokenizer = load_world_tokenizer(trained[0] / "world")
    captions = ['The text "YAK".', "A red circle, a blue star and a green cross at the top."]
    ids, mask = tokenize_captions(tokenizer, captions, 12)
    assert ids.shape == mask.shape == (2, 12)
    lengths = [len(t) for t in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    assert mask[0].sum() == lengths[0] < 12 and mask[1].sum() == 12 < lengths[1]  # the long one is cut
    assert torch.all(ids[mask == 0] == tokenizer.pad_token_id)
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0] :].any()  # real tokens first


def test_the_text_tower_learns_at_its_ratio_of_the_learning_rate(trained):
    root, config, _ = trained
    tokenizer = load_world_tokenizer(root / "world")
    settings = Stage0Settings(learning_rate=1e-3, text_lr_ratio=0.1, text_width=32, text_layers=1)
    model = build_siglip(config.vision_config, tokenizer, settings)
    image_group, text_group = build_optimizer(model, settings).param_groups
    assert image_group["lr"] == 1e-3 and text_group["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in text_group["params"]} == {id(p) for p in model.text_model.parameters()}
    everything = {id(p) for p in model.parameters()}
    assert {id(p) for p in image_group["params"]} | {id(p) for p in text_group["params"]} == everything
    assert any(p is model.logit_bias for p in image_group["params"])
