"""A baseline that computes the way the original xGen-MM code does, for side-by-side timings.

It is not the original code (that is not vendored here); it re-creates, on blip3's modules and weights,
the computations the original performs (REFERENCE §1–§2), so both run in one process on one machine:

- pre-processing: PIL letterbox + paste, one PIL crop per tile, then per-tile ToTensor + Normalize
  (torchvision's transforms, written out: torchvision does not import beside the CPU torch build);
- vision tower: the full SigLIP forward, attention-pooling head included (its output unused);
- perceiver: lucidrains-style attention with `einsum`, an explicit max-subtracted softmax;
- language model: eager attention (transformers 4.44 had no sdpa path for Phi-3);
- head: logits for every position over all 32,064 rows + bias, sliced to 32,012, concatenated with
  the added tokens' logits; the loss is then taken over the full `[B, N, V]` tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.modeling.sampler import PerceiverAttention
from blip3.modeling.splice import IGNORE_INDEX
from blip3.modeling.text import DecoupledLMHead
from blip3.processing.anyres import plan_anyres

# -- pre-processing -------------------------------------------------------------------------------


def original_preprocess(image: Image.Image, grids, base: int, mean=0.5, std=0.5) -> torch.Tensor:
    plan = plan_anyres(image.size, grids, base)
    canvas = Image.new("RGB", plan.canvas, (0, 0, 0))
    canvas.paste(image.resize(plan.resized), plan.offset)
    width, height = plan.canvas
    crops = [canvas.crop((x, y, x + base, y + base)) for y in range(0, height, base) for x in range(0, width, base)]
    tiles = [image.resize((base, base))] + crops
    tensors = []
    for tile in tiles:
        tile = tile.resize((base, base))  # the transform's Resize: a copy for crops already at base size
        tensor = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
        tensors.append(tensor.sub(mean).div(std))
    return torch.stack(tensors)


# -- model ---------------------------------------------------------------------------------------


def _einsum_perceiver_attention(self: PerceiverAttention, media, latents, key_mask):
    media, latents = self.norm_media(media), self.norm_latents(latents)
    h = self.heads
    q = self.to_q(latents)
    k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
    q = q * q.shape[-1] ** -0.5
    sim = torch.einsum("bhid,bhjd->bhij", q, k)
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None, None, :], -math.inf)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    return self.to_out(out.transpose(1, 2).flatten(2))


def _full_vocabulary_head(self: DecoupledLMHead, hidden_states):
    logits = F.linear(hidden_states, self.weight, self.bias)  # all rows, then slice
    return torch.cat([logits[..., : self.num_base], self.additional_fc(hidden_states)], dim=-1)


def _encode_tiles_with_pooling_head(self, pixel_values):
    with torch.no_grad():
        return self.vision_tower(pixel_values).last_hidden_state


def _loss_over_full_logits(self, hidden_states, labels, num_items_in_batch=None):
    logits = self.lm_head(hidden_states).float()
    ignored = torch.tensor(self.config.ignored_label_ids)
    labels = labels.masked_fill(torch.isin(labels, ignored), IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def make_original_style(model: Blip3ForConditionalGeneration) -> Blip3ForConditionalGeneration:
    """Rebind `model`'s hot paths to the original's way of computing them (same weights, same outputs)."""
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    for module in model.modules():
        if isinstance(module, PerceiverAttention):
            module.forward = _einsum_perceiver_attention.__get__(module)
    model.lm_head.forward = _full_vocabulary_head.__get__(model.lm_head)
    model.model.encode_tiles = _encode_tiles_with_pooling_head.__get__(model.model)
    model.text_loss = _loss_over_full_logits.__get__(model)
    # transformers 4.44 computed the prefill's logits at every position, not only the last
    forward = model.forward

    def forward_with_all_logits(*args, logits_to_keep=0, **kwargs):
        return forward(*args, **kwargs)

    model.forward = forward_with_all_logits
    return model
