"""The vision token sampler: a Flamingo-style perceiver resampler (REFERENCE §1.3).

A fixed set of learned latents cross-attends to one tile's vision features and comes out as
`num_latents` tokens of the LM's width. The math is the original's exactly:

    per layer:  L += Attn(q = LN_l(L),  k, v = [LN_m(x) ; LN_l(L)])     keys: media *and* latents
                L += FFN(LN(L))                                            no biases anywhere
    output:     Linear(LN(L))                                              the only bias

Letterbox cells of the media are masked out of the keys; the latent keys never are, so no row of
the softmax is ever empty. There are no positional embeddings: only *which* cells a tile holds matters.
(With the optional `tile_position_code`, not the original's, `locate` adds where each view lies.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from blip3.config import Blip3SamplerConfig
from blip3.modeling.anyres import TILE_CODE_WIDTH, tile_position_codes


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, eps: float):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim, eps=eps)
        self.norm_latents = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # media [n, m, d], latents [n, q, d], key_mask [n, m + q] bool (True = attend) or None
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)  # [n, q, h·dh]
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # [n, m+q, h·dh] each
        # split channels as (head, dim_head), head outermost, as the original's rearrange does
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [n, h, len, dh]
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale dh^-0.5, as the original
        return self.to_out(out.transpose(1, 2).flatten(2))  # [n, q, d]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverLayer(GradientCheckpointingLayer):
    def __init__(self, config: Blip3SamplerConfig):
        super().__init__()
        dim, eps = config.input_dim, config.layer_norm_eps
        self.attn = PerceiverAttention(dim, config.heads, config.dim_head, eps)
        self.ff = FeedForward(dim, config.ff_mult, eps)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = self.attn(media, latents, key_mask) + latents
        return self.ff(latents) + latents


class TokenSampler(nn.Module):
    """Resample each row of `media` [n, m, d_vis] to `num_latents` tokens [n, num_latents, d_llm].

    With `instruction_aware` (r-v1, REFERENCE §1.4) the caller's instruction embeddings, projected to
    the vision width, join the latent queries; only the latents' outputs are kept.
    """

    def __init__(self, config: Blip3SamplerConfig):
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.input_dim))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.input_dim, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.input_dim, config.output_dim)
        if config.instruction_aware:
            self.text_projection = nn.Sequential(
                nn.Linear(config.output_dim, config.input_dim), nn.GELU(), nn.Linear(config.input_dim, config.input_dim)
            )
        if config.tile_position_code:  # our addition, off for the released models (see the config)
            self.tile_position = nn.Linear(TILE_CODE_WIDTH, config.output_dim)

    def forward(
        self,
        media: torch.Tensor,
        media_mask: torch.Tensor | None = None,
        instruction: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # media [n, m, d_vis]; media_mask [n, m] bool (True = real image cell) or None for all-valid
        # instruction [n, t, d_llm] (LM input embeddings of the prompt), instruction_mask [n, t] bool
        n = media.shape[0]
        latents = self.latents.expand(n, -1, -1)  # [n, q, d]
        if instruction is not None:
            latents = torch.cat([latents, self.text_projection(instruction)], dim=1)
        key_mask = None
        if media_mask is not None or instruction_mask is not None:
            media_mask = media_mask if media_mask is not None else media.new_ones(media.shape[:2], dtype=torch.bool)
            query_mask = media.new_ones((n, latents.shape[1]), dtype=torch.bool)
            if instruction_mask is not None:
                query_mask[:, self.config.num_latents :] = instruction_mask  # padded prompt tokens are no keys
            key_mask = torch.cat([media_mask, query_mask], dim=1)  # [n, m + q]
        for layer in self.layers:
            latents = layer(media, latents, key_mask)
        latents = latents[:, : self.config.num_latents]
        return self.projection(self.norm(latents))  # [n, num_latents, d_llm]

    def locate(self, tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """One image's tokens [views, q, d_llm] plus the learned code of where each view lies (`grid`
        None: a single global view). Only with `tile_position_code`."""
        codes = tile_position_codes(grid, device=tokens.device, dtype=tokens.dtype)
        if len(codes) != len(tokens):
            raise ValueError(f"{len(tokens)} views of an image but grid {grid} makes {len(codes)}")
        return tokens + self.tile_position(codes)[:, None]
