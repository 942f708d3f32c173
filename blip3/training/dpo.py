"""Direct preference optimisation on multimodal preference pairs, with the LoRA-disabled model as reference.

One micro-batch of B pairs (`blip3.data.collate_preference`: a `chosen` and a `rejected` batch, row i of
both being pair i, with the same prompt and images) goes through the model twice:

    reference   no grad, adapters switched off (`lora.disable_adapter`): the base model, no second copy
    policy      with grad, adapters on
    each pass   chosen rows then rejected rows concatenated into ONE forward of 2B rows (re-padded to the
                longer width); prompts hold any number of images each, interleaved anywhere in the prompt

Per-sequence log-probabilities log π(y | x) are sums over the response tokens only (labels are −100 on
the prompt, as `tokenize_preference_pair` writes them). No [2B, N, V] logits are formed: the LM's last
hidden states at the positions that predict a response token are gathered (M of them) and each row's
sum goes through the fused head + cross-entropy of `modeling/loss.py` (logits in chunks of M × V, the
gradient computed in the same pass).

Images sit in the prompt, before every response token, so a row's response is shifted as a whole by the
vision tokens spliced in front of it: `shift = spliced length − text length` maps a text position to its
spliced position (a response token before an image of its row is refused, loudly).

The losses (`dpo_loss`), on Δ = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]:

    sigmoid   −log σ(βΔ)                                        DPO (Rafailov et al., 2023)
    robust    [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)      label smoothing ε (Chowdhury et al., 2024)
    hinge     max(0, 1 − βΔ)                                    SLiC-HF (Zhao et al., 2023)
    ipo       (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²                 IPO, length-normalised (Azar et al., 2023)

each equal to TRL's `DPOTrainer` on the same log-probabilities (tested). `sft_weight` > 0 adds
α · (−log π(y_w))/|y_w| per pair (RPO, Pang et al., 2024), which keeps the chosen answers likely.
Rewards are β × the log-ratios, as TRL logs them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip3.config import IGNORE_INDEX
from blip3.modeling.loss import linear_cross_entropy
from blip3.modeling.model import supervised_targets
from blip3.training.distributed import unwrap
from blip3.training.lora import disable_adapter, has_lora, unload

LOSSES = ("sigmoid", "robust", "hinge", "ipo")
IMAGE_ENTRIES = ("pixel_values", "image_sizes", "num_tiles", "num_images")


@dataclass
class DPOSettings:
    """The `train.dpo` section of a recipe (used with `train.objective: dpo`)."""

    beta: float = 0.1  # our choice (TRL's default); the paper does not publish its β
    loss: str = "sigmoid"  # sigmoid | robust | hinge | ipo
    label_smoothing: float = 0.0  # ε of the robust loss
    sft_weight: float = 0.0  # α of the RPO term on the chosen answers (0: plain DPO)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DPOSettings:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in train.dpo; known: {sorted(known)}")
        settings = cls(**{k: float(v) if k != "loss" else v for k, v in values.items()})
        if settings.loss not in LOSSES:
            raise ValueError(f"train.dpo.loss must be one of {LOSSES}, got {settings.loss!r}")
        if settings.beta <= 0:
            raise ValueError(f"train.dpo.beta must be positive, got {settings.beta}")
        if not 0.0 <= settings.label_smoothing < 0.5:
            raise ValueError(f"train.dpo.label_smoothing must be in [0, 0.5), got {settings.label_smoothing}")
        if settings.label_smoothing and settings.loss != "robust":
            raise ValueError("train.dpo.label_smoothing applies to loss: robust only")
        return settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# the loss, on per-sequence log-probabilities


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    settings: DPOSettings,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair losses [B] from summed response log-probabilities [B] (lengths: response tokens, for ipo and
    the RPO term)."""
    beta, eps = settings.beta, settings.label_smoothing
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if settings.loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif settings.loss == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif settings.loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif settings.loss == "ipo":
        _require_lengths(chosen_lengths, rejected_lengths, "the ipo loss")
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {settings.loss!r}; choose one of {LOSSES}")
    if settings.sft_weight:
        _require_lengths(chosen_lengths, rejected_lengths, "sft_weight")
        losses = losses - settings.sft_weight * policy_chosen / chosen_lengths.clamp(min=1)
    return losses


def _require_lengths(chosen_lengths, rejected_lengths, what: str) -> None:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"{what} needs the response lengths")


# ---------------------------------------------------------------------------------------------------
# per-sequence log-probabilities


def concatenate_pairs(batch: Mapping[str, Any], pad_token_id: int) -> dict[str, Any]:
    """The model inputs of a preference batch: chosen rows then rejected rows, right-padded to one width."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

    def stacked(name: str, fill: int) -> torch.Tensor:
        return torch.cat(
            [F.pad(part[name], (0, width - part[name].shape[1]), value=fill) for part in (chosen, rejected)]
        )

    inputs = {
        "input_ids": stacked("input_ids", pad_token_id),
        "attention_mask": stacked("attention_mask", 0),
        "labels": stacked("labels", IGNORE_INDEX),
    }
    if ("pixel_values" in chosen) != ("pixel_values" in rejected):
        raise ValueError("the chosen and rejected answers of a pair must share their images")
    if "pixel_values" in chosen:
        inputs.update({name: torch.cat([chosen[name], rejected[name]]) for name in IMAGE_ENTRIES})
    return inputs


def response_positions(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    spliced_attention_mask: torch.Tensor,
    image_token_id: int,
    ignored_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, spliced position of the hidden state that predicts it, token) for every response token, in
    row order. Inputs are right-padded text [R, T]; the spliced mask [R, N] is the model's."""
    rows, columns = supervised_targets(labels, ignored_ids).nonzero(as_tuple=True)  # target at column + 1
    targets = labels[rows, columns + 1]
    is_image = input_ids == image_token_id
    width = input_ids.shape[1]
    last_image = torch.where(is_image.any(1), width - 1 - is_image.flip(1).int().argmax(1), -1)
    early = columns + 1 <= last_image[rows]
    if bool(early.any()):
        row = int(rows[early][0])
        raise ValueError(
            f"row {row}: a response token comes before an image of its prompt; responses follow the images"
        )
    shift = spliced_attention_mask.sum(1) - attention_mask.sum(1)  # vision tokens added before the response
    return rows, columns + shift[rows], targets


def sequence_logps(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p of each row's response tokens [R], response lengths [R]) in one forward of the rows."""
    core = unwrap(model)
    config = core.config
    outputs = model(
        **{k: v for k, v in inputs.items() if k != "labels"},
        output_hidden_states=True,
        return_logits=False,
        use_cache=False,
    )
    hidden = outputs.hidden_states[-1]  # [R, N, d] after the final norm
    rows, positions, targets = response_positions(
        inputs["input_ids"],
        inputs["labels"],
        inputs["attention_mask"],
        outputs.attention_mask,
        config.image_token_id,
        config.ignored_label_ids,
    )
    lengths = torch.bincount(rows, minlength=len(inputs["input_ids"]))
    selected = hidden[rows, positions]  # [M, d]
    head, added = core.lm_head, core.lm_head.additional_fc
    logps = [
        -linear_cross_entropy(
            states,
            head.weight,
            head.bias,
            added.weight if added is not None else None,
            added.bias if added is not None else None,
            tokens,
            head.num_base,
        )
        for states, tokens in zip(selected.split(lengths.tolist()), targets.split(lengths.tolist()))
    ]
    return torch.stack(logps), lengths


# ---------------------------------------------------------------------------------------------------
# what the trainer calls


class DPOObjective:
    """One micro-batch of pairs -> the summed DPO loss / normaliser, and summed statistics for the logs.

    reference: "adapter" (the model with its LoRA adapter disabled) or "copy" (a frozen deep copy of the
    base model, adapters dropped; the usual alternative, which the benchmark compares against: it holds
    the model's weights twice).
    """

    def __init__(self, settings: DPOSettings, pad_token_id: int, model: nn.Module | None = None, reference="adapter"):
        if reference not in ("adapter", "copy"):
            raise ValueError(f"reference must be 'adapter' or 'copy', got {reference!r}")
        self.settings, self.pad_token_id = settings, pad_token_id
        self.reference_model = None
        if reference == "copy":
            if model is None:
                raise ValueError("a copied reference needs the model to copy")
            reference_model = copy.deepcopy(unwrap(model)).requires_grad_(False)
            self.reference_model = unload(reference_model) if has_lora(reference_model) else reference_model

    @staticmethod
    def num_pairs(batch: Mapping[str, Any]) -> int:
        return len(batch["chosen"]["input_ids"])

    def reference_logps(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_model is not None:
                return sequence_logps(self.reference_model, inputs)[0]
            core = unwrap(model)  # bypasses DDP (no gradients to synchronise); FSDP2's hooks live on the modules
            with disable_adapter(core):
                return sequence_logps(core, inputs)[0]

    def micro_step(
        self, model: nn.Module, batch: Mapping[str, Any], normaliser: float, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(Σ_pairs loss / normaliser, for backward; sums over the pairs of the logged statistics)."""
        inputs = {k: v.to(device, non_blocking=True) for k, v in concatenate_pairs(batch, self.pad_token_id).items()}
        pairs = self.num_pairs(batch)
        reference = self.reference_logps(model, inputs)
        policy, lengths = sequence_logps(model, inputs)
        losses = dpo_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            self.settings,
            lengths[:pairs],
            lengths[pairs:],
        )
        with torch.no_grad():
            beta = self.settings.beta
            chosen_rewards = beta * (policy[:pairs] - reference[:pairs])
            rejected_rewards = beta * (policy[pairs:] - reference[pairs:])
            stats = {
                "loss": losses.sum(),
                "rewards/chosen": chosen_rewards.sum(),
                "rewards/rejected": rejected_rewards.sum(),
                "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
                "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
                "logps/chosen": policy[:pairs].sum(),
                "logps/rejected": policy[pairs:].sum(),
                "nll/chosen": (-policy[:pairs] / lengths[:pairs].clamp(min=1)).sum(),
            }
        summary = {name: float(value) for name, value in stats.items()}
        summary["target_tokens"] = int(lengths.sum())
        return losses.sum() / normaliser, summary


__all__ = [
    "LOSSES",
    "DPOObjective",
    "DPOSettings",
    "concatenate_pairs",
    "dpo_loss",
    "response_positions",
    "sequence_logps",
]
