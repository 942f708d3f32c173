"""DPO: the losses against TRL's on identical log-probabilities, per-sequence log-probabilities, a DPO step."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from trl import DPOTrainer

from blip3.data.collate import model_inputs
from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.posttrain.testing import preference_batch, tiny_config
from blip3.training.dpo import DPOObjective, DPOSettings, concatenate_pairs, dpo_loss, sequence_logps
from blip3.training.lora import LoraSettings, apply_lora, disable_adapter

SAMPLER = ["to_q", "to_kv", "to_out", "fc1", "fc2", "projection"]

# -- the loss against TRL ------------------------------------------------------------------------------


def trl_loss(logps: dict[str, torch.Tensor], lengths: torch.Tensor, beta: float, loss_types, weights=None, eps=0.0):
    """TRL's DPOTrainer loss (its own `_compute_loss`) on given per-sequence log-probabilities.

    A stand-in model returns per-token log-probabilities whose sums over each completion are the given
    ones (all of a sequence's mass on its first completion token); the reference log-probabilities go in
    as precomputed, which TRL supports. lengths [2B]: completion tokens of the chosen, then rejected rows.
    """
    rows, width = len(lengths), int(lengths.max()) + 2
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    per_token = torch.zeros(rows, width - 1, dtype=torch.float64)
    policy = torch.cat([logps["policy_chosen"], logps["policy_rejected"]])
    for row, length in enumerate(lengths.tolist()):
        completion_mask[row, 1 : 1 + length] = 1  # token 0 is the prompt
        per_token[row, 0] = policy[row]  # the logit at position 0 predicts token 1, the first completion token
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer = SimpleNamespace(  # the attributes `_compute_loss` reads
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": logps["reference_chosen"],
        "ref_rejected_logps": logps["reference_rejected"],
    }
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


def random_logps(seed: int, pairs: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    names = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    logps = {name: -torch.rand(pairs, generator=generator, dtype=torch.float64) * 40 for name in names}
    return logps, torch.randint(1, 30, (2 * pairs,), generator=generator)


@pytest.mark.parametrize(
    "settings",
    [
        DPOSettings(beta=0.1),
        DPOSettings(beta=0.5),
        DPOSettings(beta=0.1, loss="robust", label_smoothing=0.1),
        DPOSettings(beta=0.2, loss="hinge"),
        DPOSettings(beta=0.1, loss="ipo"),
    ],
    ids=["sigmoid-0.1", "sigmoid-0.5", "robust", "hinge", "ipo"],
)
def test_our_dpo_losses_equal_trls_on_identical_log_probabilities(settings):
    for seed in range(3):
        logps, lengths = random_logps(seed)
        ours = dpo_loss(*logps.values(), settings, lengths[:16], lengths[16:]).mean()
        theirs = trl_loss(logps, lengths, settings.beta, [settings.loss], eps=settings.label_smoothing)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (seed, ours.item(), theirs.item())


def test_the_rpo_term_equals_trls_sft_loss_when_the_chosen_answers_are_equally_long():
    logps, lengths = random_logps(7)
    lengths[:16] = 11  # TRL averages over the batch's tokens, RPO per pair: the same for equal lengths
    settings = DPOSettings(beta=0.1, sft_weight=0.3)
    ours = dpo_loss(*logps.values(), settings, lengths[:16], lengths[16:]).mean()
    theirs = trl_loss(logps, lengths, 0.1, ["sigmoid", "sft"], weights=[1.0, 0.3])
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    plain = dpo_loss(*logps.values(), DPOSettings(beta=0.1)).mean()
    assert not torch.allclose(ours, plain)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"loss": "kto"}, "must be one of"),
        ({"beta": 0}, "must be positive"),
        ({"label_smoothing": 0.1}, "robust only"),
        ({"gamma": 1}, "unknown field"),
    ],
)
def test_dpo_settings_mistakes_are_named(section, message):
    with pytest.raises(ValueError, match=message):
        DPOSettings.from_dict(section)


# -- log-probabilities and a step on the tiny model ----------------------------------------------------


@pytest.fixture(scope="module")
def batch(processor):
    """Three pairs whose prompts hold 0, 1 and 3 images (interleaved in the text), ragged lengths."""
    return preference_batch(processor, np.random.default_rng(0), (0, 1, 3))


def lora_model(seed: int = 0, scale: float = 0.0):
    torch.manual_seed(seed)
    model = Blip3ForConditionalGeneration(tiny_config())
    apply_lora(model, LoraSettings(rank=4, dropout=0.0, token_sampler=SAMPLER))
    if scale:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_sequence_logps_equal_the_log_softmax_of_full_logits_at_the_response(batch, processor):
    model = lora_model(scale=0.05).eval()
    inputs = concatenate_pairs(batch, processor.pad_token_id)
    assert inputs["input_ids"].shape[0] == 6 and inputs["num_images"].tolist() == [0, 1, 3, 0, 1, 3]
    with torch.no_grad():
        logps, lengths = sequence_logps(model, inputs)
        out = model(**inputs, return_logits=True)  # the model's own splice gives the spliced labels
    log_probs = out.logits[:, :-1].log_softmax(-1)
    targets = out.labels[:, 1:]
    supervised = targets != -100
    expected = (log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * supervised).sum(1)
    assert torch.equal(lengths, supervised.sum(1))
    assert torch.allclose(logps, expected, atol=1e-4, rtol=1e-5)
    assert (
        lengths.tolist()
        == (batch["chosen"]["labels"][:, 1:] != -100).sum(1).tolist()
        + (batch["rejected"]["labels"][:, 1:] != -100).sum(1).tolist()
    )


def test_chosen_and_rejected_in_one_forward_equal_separate_forwards(batch, processor):
    model = lora_model(scale=0.05).eval()
    with torch.no_grad():
        together, _ = sequence_logps(model, concatenate_pairs(batch, processor.pad_token_id))
        chosen, _ = sequence_logps(model, model_inputs(batch["chosen"]))
        rejected, _ = sequence_logps(model, model_inputs(batch["rejected"]))
    assert torch.allclose(together, torch.cat([chosen, rejected]), atol=1e-5)


def test_the_reference_is_the_base_model_with_no_copy(batch, processor):
    base = lora_model().eval()  # B = 0: the adapter changes nothing yet
    inputs = concatenate_pairs(batch, processor.pad_token_id)
    with torch.no_grad():
        base_logps, _ = sequence_logps(base, inputs)
    trained = lora_model(scale=0.05).eval()  # same seed: the same base weights, a non-zero adapter
    with torch.no_grad():
        policy, _ = sequence_logps(trained, inputs)
        reference = DPOObjective(DPOSettings(), processor.pad_token_id).reference_logps(trained, inputs)
    assert torch.equal(reference, base_logps)
    assert (policy - reference).abs().max() > 1e-3


def test_a_dpo_step_on_prompts_with_0_1_and_3_images_moves_only_the_adapters(batch, processor):
    model = lora_model().train()  # a fresh adapter: the policy is the reference, the loss is ln 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    objective = DPOObjective(DPOSettings(beta=1.0), processor.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss, stats = objective.micro_step(model, batch, normaliser=3, device=torch.device("cpu"))
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert with_grad and all(".lora_" in n for n in with_grad)
            assert any(n.startswith("model.token_sampler.") for n in with_grad)  # through the images too
            assert any(n.startswith("model.language_model.") for n in with_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(stats["loss"] / 3)
        assert stats["target_tokens"] == int((concatenate_pairs(batch, 0)["labels"][:, 1:] != -100).sum())
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_response_before_an_image_is_refused(batch, processor):
    inputs = concatenate_pairs(batch, processor.pad_token_id)
    labels = inputs["labels"].clone()
    row = 2  # 3 images
    first_image = int((inputs["input_ids"][row] == processor.image_token_id).nonzero()[0])
    labels[row, first_image - 1] = inputs["input_ids"][row, first_image - 1]
    with torch.no_grad(), pytest.raises(ValueError, match="before an image"):
        sequence_logps(lora_model(), {**inputs, "labels": labels})


def test_the_disabled_adapter_is_switched_back_on_after_an_error(batch, processor):
    model = lora_model(scale=0.05).eval()
    inputs = concatenate_pairs(batch, processor.pad_token_id)
    with torch.no_grad():
        before, _ = sequence_logps(model, inputs)
        with pytest.raises(RuntimeError), disable_adapter(model):
            raise RuntimeError("inside the reference forward")
        after, _ = sequence_logps(model, inputs)
    assert torch.equal(before, after)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
