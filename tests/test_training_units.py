"""Pieces of the training engine on their own: recipes, trainable parts, initialisation, checkpoint state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from blip3 import Blip3ForConditionalGeneration, preset
from blip3.training.checkpoint import (
    host_rng_state,
    join_optimizer_state,
    latest_checkpoint,
    restore_host_rng_state,
    split_optimizer_state,
)
from blip3.training.config import load_config
from blip3.training.trainer import load_language_model, load_vision_tower, select_trainable


def test_recipe_overrides_are_parsed_as_yaml_and_numbers_coerced(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 2e-5\n  warmup_steps: 10\ntrain:\n  steps: 5\n")
    config = load_config(
        recipe, ["train.precision=bf16", "optim.betas=[0.9, 0.95]", "model.overrides.vision_token_mode=base"]
    )
    assert config.optim.lr == 2e-5 and isinstance(config.optim.lr, float)  # PyYAML reads 2e-5 as a string
    assert config.train.precision == "bf16" and config.train.steps == 5
    assert list(config.optim.betas) == [0.9, 0.95]
    assert config.model.overrides == {"vision_token_mode": "base"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.learning_rate=1", "unknown field"),
        ("trian.steps=1", "unknown config section"),
        ("steps=1", "section.field"),
    ],
)
def test_recipe_mistakes_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_only_selected_parts_train_and_the_vision_tower_never():
    model = Blip3ForConditionalGeneration(preset("tiny"))
    select_trainable(model, ["token_sampler"])
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"token_sampler"}
    with pytest.raises(ValueError, match="always frozen"):
        select_trainable(model, ["vision_tower"])


def test_pretrained_language_model_and_vision_tower_load_into_their_places(tmp_path):
    torch.manual_seed(0)
    config = preset("tiny")
    lm = Phi3ForCausalLM(
        Phi3Config(**{k: v for k, v in config.text_config.to_dict().items() if k in Phi3Config().to_dict()})
    )
    lm.save_pretrained(tmp_path / "lm")
    tower = SiglipVisionModel(SiglipVisionConfig(**config.vision_config.to_dict()))
    tower.save_pretrained(tmp_path / "tower")

    model = Blip3ForConditionalGeneration(config)
    added_before = model.model.language_model.embed_tokens.additional_embedding.weight.clone()
    load_language_model(model, str(tmp_path / "lm"))
    load_vision_tower(model, str(tmp_path / "tower"))
    assert torch.equal(
        model.model.language_model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight
    )
    assert torch.equal(model.model.language_model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    assert torch.equal(model.model.language_model.embed_tokens.additional_embedding.weight, added_before)
    assert torch.equal(model.model.vision_tower.post_layernorm.weight, tower.post_layernorm.weight)


def test_optimizer_state_survives_the_tensor_json_split():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    named = {
        "state": {name: state["state"][i] for i, (name, _) in enumerate(model.named_parameters())},
        "param_groups": [{**g, "params": [n for n, _ in model.named_parameters()]} for g in state["param_groups"]],
    }
    tensors, groups = split_optimizer_state(named)
    joined = join_optimizer_state(tensors, json.loads(json.dumps(groups)))
    assert joined["param_groups"][0]["betas"] == (0.8, 0.9)
    for name in named["state"]:
        for key, value in named["state"][name].items():
            assert torch.equal(joined["state"][name][key], value)


def test_host_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    saved = json.loads(json.dumps(host_rng_state()))
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)
    restore_host_rng_state(saved)
    assert (random.random(), np.random.rand()) == expected


def test_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step-000002").mkdir(parents=True)
    (folder / "step-000010").mkdir()
    (folder / "tmp-step-000012").mkdir()  # a save killed half-way
    assert latest_checkpoint(tmp_path) == folder / "step-000010"
    assert latest_checkpoint(tmp_path / "nothing") is None
