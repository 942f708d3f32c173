"""Configuration of a blip3 model and the named presets.

A `Blip3Config` nests three configs, one per part of the data flow:

    vision_config   SigLIP vision transformer (transformers' `SiglipVisionConfig`), frozen
    sampler_config  perceiver-resampler "vision token sampler" (`Blip3SamplerConfig`)
    text_config     any causal LM config transformers knows (Phi-3-mini for the released models)

and the settings that bind them: how images become vision tokens (`vision_token_mode`, the any-res
grids, the original "stripe" regrouping) and the ids of the special tokens.

Vocabulary layout (REFERENCE §1.5). The LM's own embedding table has `text_config.vocab_size` rows,
of which the first `initial_tokenizer_len` are used; the `num_added_tokens` xGen-MM tokens
(`<image>`, `<image placeholder>`, `<|endofchunk|>`) live in separate rows after them, so the model
reads and predicts `initial_tokenizer_len + num_added_tokens` ids in all (32,015 for Phi-3).
"""

from __future__ import annotations

from typing import Any, Literal

from transformers import AutoConfig, PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec

from blip3.processing import anyres

VisionTokenMode = Literal["anyres-patch", "anyres-fixed", "base"]
VISION_TOKEN_MODES = ("anyres-patch", "anyres-fixed", "base")
IGNORE_INDEX = -100  # the label of positions the loss skips (PyTorch's and transformers' convention)


class Blip3SamplerConfig(PreTrainedConfig):
    """The perceiver resampler that turns a tile's vision features into `num_latents` LM tokens.

    Defaults are the original `PerceiverResampler`'s (REFERENCE §1.3).
    """

    model_type = "blip3_sampler"
    base_config_key = "sampler_config"

    input_dim: int = 1152  # width of the vision features (and of the latents)
    output_dim: int = 3072  # width of the LM embeddings
    num_latents: int = 128  # vision tokens per tile
    depth: int = 6
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4
    layer_norm_eps: float = 1e-5
    # r-v1's instruction-aware sampler (REFERENCE §1.4): the prompt's first tokens join the latent queries.
    instruction_aware: bool = False
    max_instruction_tokens: int = 256
    # Not in xGen-MM (off for the released models): add to each view's tokens a learned projection of
    # where the view lies in the image (`anyres.tile_position_codes`). The original's only tile-position
    # signal is the order of the tiles' tokens, which a large LM learns to use and a tiny one does not.
    tile_position_code: bool = False


class Blip3Config(PreTrainedConfig):
    r"""Configuration of `Blip3ForConditionalGeneration`.

    vision_token_mode:
        `"anyres-patch"` (released design): a global view plus 2–4 tiles, each resampled to `num_latents` tokens.
        `"anyres-fixed"`: the same tiles, all resampled together once to `num_latents` tokens per image.
        `"base"`: one squashed base-size view, `num_latents` tokens.
    anyres_grids: candidate canvases as (columns, rows) multiples of the vision tower's image size.
    stripe_regrouping: reproduce the released models' quirk of regrouping the sub-tile features of grids two
        or more tiles wide into horizontal stripes (REFERENCE §2.3 step 5). On for converted official
        checkpoints (they were trained that way); off means each group is exactly one tile.
    """

    model_type = "blip3"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "sampler_config": Blip3SamplerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    sampler_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    vision_token_mode: str = "anyres-patch"
    anyres_grids: list | tuple = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
    stripe_regrouping: bool = False
    image_mean: list | tuple = (0.5, 0.5, 0.5)
    image_std: list | tuple = (0.5, 0.5, 0.5)

    # vocabulary layout (see module docstring); ids are those of the Phi-3 tokenizer
    initial_tokenizer_len: int = 32012
    num_added_tokens: int = 3
    lm_head_bias: bool = True  # the released head carries a bias (REFERENCE §1.5)
    pad_token_id: int = 32011
    image_token_id: int = 32012
    image_placeholder_token_id: int = 32013
    end_of_chunk_token_id: int = 32014
    bos_token_id: int | None = 1
    stop_token_ids: list | tuple = (32007, 32000)  # <|end|> ends an assistant turn, <|endoftext|> the text
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.anyres_grids = [list(map(int, grid)) for grid in self.anyres_grids]
        self.image_mean, self.image_std = list(self.image_mean), list(self.image_std)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate_layout()

    def validate_layout(self) -> None:
        if self.vision_token_mode not in VISION_TOKEN_MODES:
            raise ValueError(f"vision_token_mode must be one of {VISION_TOKEN_MODES}, got {self.vision_token_mode!r}")
        if not self.anyres_grids:
            raise ValueError("anyres_grids must list at least one (columns, rows) grid")
        if self.initial_tokenizer_len > self.text_config.vocab_size:
            raise ValueError(
                f"initial_tokenizer_len ({self.initial_tokenizer_len}) exceeds the LM's embedding rows "
                f"(text_config.vocab_size = {self.text_config.vocab_size})"
            )
        added = [self.image_token_id, self.image_placeholder_token_id, self.end_of_chunk_token_id][
            : self.num_added_tokens
        ]
        for token_id in added:
            if not self.initial_tokenizer_len <= token_id < self.vocab_size:
                raise ValueError(
                    f"added token id {token_id} must lie in [{self.initial_tokenizer_len}, {self.vocab_size})"
                )
        if self.sampler_config.input_dim != self.vision_config.hidden_size:
            raise ValueError("sampler_config.input_dim must equal vision_config.hidden_size")
        if self.sampler_config.output_dim != self.text_config.hidden_size:
            raise ValueError("sampler_config.output_dim must equal text_config.hidden_size")
        if self.sampler_config.tile_position_code and self.stripe_regrouping:
            raise ValueError(
                "sampler_config.tile_position_code describes whole tiles, but stripe_regrouping resamples "
                "stripes of the canvas: use one or the other"
            )

    @property
    def vocab_size(self) -> int:
        """Number of ids the model reads and predicts: the used base rows plus the added tokens."""
        return self.initial_tokenizer_len + self.num_added_tokens

    @property
    def image_size(self) -> int:
        """Side of one tile in pixels (the vision tower's input size)."""
        return self.vision_config.image_size

    @property
    def feature_grid(self) -> int:
        """Side of one tile's feature map in cells (27 for SigLIP so400m/14 at 384 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.sampler_config.num_latents

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(cols), int(rows)) for cols, rows in self.anyres_grids)

    def image_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of sub-tiles for an image of size (W, H), by the original's best-canvas rule."""
        return anyres.select_best_grid(image_size, self.grids, self.image_size)

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles the processor cuts from an image of size (W, H)."""
        return anyres.count_tiles(image_size, self.vision_token_mode, self.grids, self.image_size)

    def num_vision_tokens(self, image_size: tuple[int, int]) -> int:
        """LM positions an image of size (W, H) takes once spliced."""
        return anyres.count_vision_tokens(
            image_size, self.vision_token_mode, self.grids, self.image_size, self.sampler_config.num_latents
        )

    @property
    def ignored_label_ids(self) -> list[int]:
        """Ids never trained as targets: the pad and the added special tokens (REFERENCE §3.2 step 4)."""
        added = [self.image_token_id, self.image_placeholder_token_id, self.end_of_chunk_token_id]
        return [self.pad_token_id, *added[: self.num_added_tokens]]


# ---------------------------------------------------------------------------------------------------
# Presets

_PHI3_IDS = dict(bos_token_id=1, eos_token_id=32000, pad_token_id=32000)  # Phi3Config defaults eos=pad=32000


def _tiny() -> dict[str, Any]:
    """The dimensions of the reference fixture `xgenmm-tiny-a`: runs in milliseconds on a CPU."""
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        ),
        sampler_config=dict(input_dim=16, output_dim=16, num_latents=4),
        text_config=dict(
            model_type="phi3",
            vocab_size=32064,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            sliding_window=2047,
            **_PHI3_IDS,
        ),
    )


def _small() -> dict[str, Any]:
    """The benchmark configuration (benchmarks/README.md): big enough that matmuls dominate."""
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
        ),
        sampler_config=dict(input_dim=256, output_dim=512, num_latents=32),
        text_config=dict(
            model_type="phi3",
            vocab_size=32064,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            sliding_window=2047,
            **_PHI3_IDS,
        ),
    )


def _xgen_mm_phi3_mini_v15() -> dict[str, Any]:
    """Salesforce xgen-mm-phi3-mini-*-r-v1.5: SigLIP so400m/14-384 + perceiver + Phi-3-mini-4k (REFERENCE §1)."""
    return dict(
        vision_config=dict(model_type="siglip_vision_model", **SIGLIP_SO400M_14_384),
        sampler_config=dict(input_dim=1152, output_dim=3072, num_latents=128),
        text_config=dict(model_type="phi3", sliding_window=2047, **_PHI3_IDS),
        stripe_regrouping=True,
    )


SIGLIP_SO400M_14_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)

PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "xgen-mm-phi3-mini-v1.5": _xgen_mm_phi3_mini_v15,
}


def preset(name: str, **overrides: Any) -> Blip3Config:
    """A named configuration; `overrides` replace top-level fields (e.g. `vision_token_mode="base"`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = PRESETS[name]()
    fields.update(overrides)
    return Blip3Config(**fields)


__all__ = ["Blip3Config", "Blip3SamplerConfig", "PRESETS", "preset", "SiglipVisionConfig", "VISION_TOKEN_MODES"]
