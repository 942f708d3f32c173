"""`tiny_world_config`: a model sized to learn the synthetic world in minutes on a 2-core CPU.

The sizes follow the world: 56-px tiles cut into 8-px patches (a 7×7 feature grid, so one small
letter is about one patch), a few perceiver latents per tile, a language model of a couple hundred
dimensions over a vocabulary of a few hundred pieces. The vocabulary layout is read off the
tokenizer, so the model and the processor agree by construction:

    LM embedding rows = initial_tokenizer_len = id of <image> (every id before it: base pieces, chat
    tokens, <pad>); <image>, <image placeholder>, <|endofchunk|> are the 3 added rows after it.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from blip3.config import Blip3Config
from blip3.processing.tokenizer import add_xgenmm_special_tokens


def tiny_world_config(
    tokenizer: PreTrainedTokenizerBase,
    vision_token_mode: str = "anyres-patch",
    image_size: int = 56,
    patch_size: int = 8,
    *,
    vision_width: int = 96,
    vision_layers: int = 3,
    vision_heads: int = 4,
    num_latents: int = 8,
    sampler_depth: int = 2,
    sampler_heads: int = 4,
    sampler_dim_head: int = 32,
    tile_position_code: bool = True,
    text_width: int = 192,
    text_layers: int = 3,
    text_heads: int = 6,
    text_init_std: float = 0.06,
    **overrides: Any,
) -> Blip3Config:
    """A `Blip3Config` whose vocabulary layout is `tokenizer`'s (the xGen-MM tokens are added if missing).

    `image_size` must be the world's `WorldSpec.tile_size` for tiles to be cut without resampling.
    `tile_position_code` (not in xGen-MM) tells each view's tokens where the view lies; a 3-layer LM does
    not learn to tell the tiles apart by the order of their tokens. After pre-training and SFT on one
    world: position 30 % and grounding 15 % without it, 43 % and 37 % with it, 63 % and 60 % with it
    and 8 latents instead of 16; on a later world 16 latents with it did as well, so 8 are kept for
    training ~20 % faster.
    `text_init_std` is the standard deviation the LM's weights and embeddings start from. transformers'
    0.02 suits large widths (Phi-3's 3,072: 0.02 ≈ 1.1/√width); at width 192 it is about a quarter of
    1/√width, and the text embeddings start 35 times smaller than the sampler's tokens. 0.06 learned
    the same budget's shape questions far better: after pre-training and SFT, test shape 50 / 65 / 60 %
    against 30 / 37 / 25 % with 0.02 (three seeds each; 0.1: 43 %; docs/demo-findings.md).
    `overrides` set other top-level `Blip3Config` fields (e.g. `stripe_regrouping`).
    """
    ids = add_xgenmm_special_tokens(tokenizer)
    image_id = ids["image"]
    if ids["pad"] >= image_id:
        raise ValueError(f"<pad> ({ids['pad']}) must come before <image> ({image_id}) to be a base id of the LM")
    if [ids["image_placeholder"], ids["end_of_chunk"]] != [image_id + 1, image_id + 2]:
        raise ValueError("the xGen-MM tokens must follow each other: <image>, <image placeholder>, <|endofchunk|>")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    stop_ids = [token_id for token_id in (ids["end"], ids["eos"]) if token_id is not None]
    return Blip3Config(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        sampler_config=dict(
            input_dim=vision_width,
            output_dim=text_width,
            num_latents=num_latents,
            depth=sampler_depth,
            heads=sampler_heads,
            dim_head=sampler_dim_head,
            ff_mult=2,
            tile_position_code=tile_position_code,
        ),
        text_config=dict(
            model_type="phi3",
            vocab_size=image_id,
            hidden_size=text_width,
            intermediate_size=int(8 / 3 * text_width) // 32 * 32,  # SwiGLU's usual 8/3 ratio, rounded
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=text_heads,
            max_position_embeddings=2048,
            original_max_position_embeddings=2048,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            initializer_range=text_init_std,
        ),
        vision_token_mode=vision_token_mode,
        initial_tokenizer_len=image_id,
        pad_token_id=ids["pad"],
        image_token_id=image_id,
        image_placeholder_token_id=ids["image_placeholder"],
        end_of_chunk_token_id=ids["end_of_chunk"],
        bos_token_id=ids["bos"],
        stop_token_ids=stop_ids,
        **overrides,
    )
