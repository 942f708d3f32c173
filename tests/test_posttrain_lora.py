"""LoRA through peft on the blip3 model: the share, targets, save/load, merge/unmerge, merged exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from blip3 import preset
from blip3.data.collate import model_inputs
from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.modeling.text import DecoupledEmbedding, DecoupledLMHead
from blip3.posttrain.testing import preference_batch, tiny_config, write_base_checkpoint
from blip3.training.lora import (
    PEFT_PREFIX,
    LoraSettings,
    apply_lora,
    disable_adapter,
    export_merged,
    has_lora,
    load_adapted,
    lora_share,
    merge_adapter,
    save_adapter,
    share_for_preset,
    unmerge_adapter,
)

SAMPLER = ["to_q", "to_kv", "to_out", "fc1", "fc2", "projection"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, processor):
    # the official layout has no switch for the stripe regrouping: its models always use it (REFERENCE §2.3)
    config = tiny_config(stripe_regrouping=True)
    return write_base_checkpoint(tmp_path_factory.mktemp("base") / "base", config, processor)


@pytest.fixture(scope="module")
def inputs(processor):
    """Answers to prompts with 0, 1 and 3 images interleaved in the text: 3 rows of model inputs."""
    return model_inputs(preference_batch(processor, np.random.default_rng(0), (0, 1, 3))["chosen"])


def adapted(base, settings: LoraSettings, seed: int = 1) -> Blip3ForConditionalGeneration:
    """The base with an adapter whose B matrices are random (at init B = 0 and the adapter is a no-op)."""
    model = Blip3ForConditionalGeneration.from_pretrained(base).eval()
    apply_lora(model, settings)
    assert not any(m.training for m in model.modules())  # the adapters' dropout follows the model's mode
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, return_logits=True).logits


def test_the_default_rank_is_about_2_5_percent_of_phi3_mini_and_the_tiny_share_is_exact():
    real = share_for_preset("xgen-mm-phi3-mini-v1.5", LoraSettings())  # the meta device: nothing allocated
    assert real.language_model_parameters == 3_821_130_051
    # rank 64 on qkv/o/gate_up/down of 32 layers: 64 · 32 · (3072+9216 + 3072+3072 + 3072+16384 + 8192+3072)
    assert real.adapter_parameters["language_model"] == 64 * 32 * 49_152
    assert 0.024 < real.language_model_share < 0.028  # 2.63 %; the paper says ~2.5 %

    tiny = share_for_preset("tiny", LoraSettings(rank=8, token_sampler=SAMPLER))
    config = preset("tiny")
    text, sampler = config.text_config, config.sampler_config
    d, f, inner = text.hidden_size, text.intermediate_size, sampler.heads * sampler.dim_head
    per_layer = (d + 3 * d) + (d + d) + (d + 2 * f) + (f + d)
    sampler_layer = (16 + inner) + (16 + 2 * inner) + (inner + 16) + (16 + 64) + (64 + 16)
    assert tiny.adapter_parameters == {
        "language_model": 8 * text.num_hidden_layers * per_layer,
        "token_sampler": 8 * (sampler.depth * sampler_layer + 16 + 16),
    }
    assert tiny.language_model_share == pytest.approx(tiny.adapter_parameters["language_model"] / 1_063_411)


def test_only_adapters_train_and_the_decoupled_embedding_and_head_stay_as_they_are(base):
    model = Blip3ForConditionalGeneration.from_pretrained(base)
    apply_lora(model, LoraSettings(rank=4, token_sampler=SAMPLER))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert {n.split(".")[1] for n in trainable} == {"language_model", "token_sampler"}
    assert type(model.get_input_embeddings()) is DecoupledEmbedding and type(model.lm_head) is DecoupledLMHead
    qkv = model.model.language_model.layers[0].self_attn.qkv_proj
    assert qkv.base_layer.weight.shape == (48, 16) and qkv.lora_B["default"].weight.shape == (48, 4)  # fused q|k|v
    share = lora_share(model)
    assert share.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"language_model": ["q_proj"]}, "no linear layer named 'q_proj'"),
        ({"vision_tower": ["q_proj"]}, "torch.no_grad"),
        ({"language_model": [], "token_sampler": []}, "targets no module"),
        ({"rank": 0}, "rank must be at least 1"),
        ({"language_model": "qkv_proj"}, "must be a list"),
        ({"lm_head": ["weight"]}, "unknown field"),
    ],
)
def test_lora_mistakes_are_named(section, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(Blip3ForConditionalGeneration(tiny_config()), LoraSettings.from_dict(section))


def test_disabling_the_adapter_gives_the_base_model_and_keeps_what_trains(base, inputs):
    reference = logits(Blip3ForConditionalGeneration.from_pretrained(base).eval(), inputs)
    model = adapted(base, LoraSettings(rank=4, token_sampler=SAMPLER))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_adapter = logits(model, inputs)
    assert (with_adapter - reference).abs().max() > 1e-2
    with disable_adapter(model):
        assert torch.equal(logits(model, inputs), reference)
    assert torch.equal(logits(model, inputs), with_adapter)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_the_adapter_saves_alone_and_loads_onto_the_base_again(base, inputs, tmp_path):
    model = adapted(base, LoraSettings(rank=4, token_sampler=SAMPLER))
    folder = save_adapter(model, tmp_path / "adapter")
    saved = load_file(folder / "adapter_model.safetensors")
    assert all(k.startswith(PEFT_PREFIX) and ".lora_" in k and ".default." not in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == lora_share(model).trainable  # the adapter alone
    expected = logits(model, inputs)

    loaded, _ = load_adapted(folder, base=base)  # ours
    assert has_lora(loaded) and torch.equal(logits(loaded.eval(), inputs), expected)
    with_peft = PeftModel.from_pretrained(Blip3ForConditionalGeneration.from_pretrained(base), folder)  # peft's own
    assert torch.equal(logits(with_peft.get_base_model().eval(), inputs), expected)


def test_merge_and_unmerge(base, inputs):
    model = adapted(base, LoraSettings(rank=4, token_sampler=SAMPLER))
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    expected = logits(model, inputs)
    merge_adapter(model)
    merged = dict(model.named_parameters())
    assert all(not torch.equal(merged[n], bases[n]) for n in bases)  # every adapted weight changed
    assert (logits(model, inputs) - expected).abs().max() < 1e-5
    unmerge_adapter(model)
    for name, weight in model.named_parameters():
        if name in bases:
            assert (weight - bases[name]).abs().max() < 1e-6, name
    assert (logits(model, inputs) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("official", [False, True], ids=["blip3", "official"])
def test_a_merged_export_gives_the_adapters_logits(base, inputs, tmp_path, official):
    model = adapted(base, LoraSettings(rank=4, token_sampler=SAMPLER))
    folder = save_adapter(model, tmp_path / "adapter")  # names the base checkpoint it was applied to
    export_merged(folder, tmp_path / "merged", official=official)
    config = (tmp_path / "merged" / "config.json").read_text()
    assert ('"model_type": "xgenmm"' in config) == official
    merged = Blip3ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, nn.Module) and "lora" in type(m).__module__ for m in merged.modules())
    assert (logits(merged, inputs) - logits(model, inputs)).abs().max() < 1e-5


def test_a_lora_checkpoint_loads_like_any_checkpoint_and_a_second_adapter_stacks_on_it(base, inputs, tmp_path):
    """`load_pretrained` (eval, serve, generate, a later stage's model.init) merges an adapter folder into
    the base it names; a further adapter (the safety stage after DPO) then names that folder as its base."""
    from blip3.factory import load_pretrained

    first = adapted(base, LoraSettings(rank=4))
    first_folder = save_adapter(first, tmp_path / "dpo")
    loaded, _ = load_pretrained(first_folder)
    assert not has_lora(loaded)  # merged: a plain model
    assert (logits(loaded.eval(), inputs) - logits(first, inputs)).abs().max() < 1e-5

    apply_lora(loaded, LoraSettings(rank=2), base=str(first_folder))
    with torch.no_grad():
        for name, parameter in loaded.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.01)
    second_folder = save_adapter(loaded, tmp_path / "safety")
    stacked, _ = load_pretrained(second_folder)
    assert (logits(stacked.eval(), inputs) - logits(loaded.eval(), inputs)).abs().max() < 1e-5
