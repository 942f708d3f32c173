"""The released xGen-MM checkpoint layout, both ways, without their remote code (REFERENCE §7).

Official folder: `config.json` with `model_type: "xgenmm"` (nested `text_config`,
`vision_encoder_config`, `vision_tokenizer_config`), weights under `vlm.*` in `model.safetensors` or
shards with `model.safetensors.index.json`. Ours: a `Blip3Config` and transformers' usual layout.

Only names change between the two; tensors are copied bit for bit, so official → ours → official is exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import save_torch_state_dict
from transformers.utils import cached_file

from blip3.config import SIGLIP_SO400M_14_384, Blip3Config

OFFICIAL_MODEL_TYPE = "xgenmm"

# Vision towers the official config names only by `model_name` (the remote code downloaded them).
KNOWN_VISION_TOWERS = {"google/siglip-so400m-patch14-384": SIGLIP_SO400M_14_384}

# official key pattern -> ours; the perceiver's layers are ModuleList([attn, Sequential(LN, Linear, GELU, Linear)])
_OFFICIAL_TO_OURS = [
    (r"^vlm\.vision_encoder\.", "model.vision_tower."),
    (r"^vlm\.vision_tokenizer\.layers\.(\d+)\.0\.", r"model.token_sampler.layers.\1.attn."),
    (r"^vlm\.vision_tokenizer\.layers\.(\d+)\.1\.0\.", r"model.token_sampler.layers.\1.ff.norm."),
    (r"^vlm\.vision_tokenizer\.layers\.(\d+)\.1\.1\.", r"model.token_sampler.layers.\1.ff.fc1."),
    (r"^vlm\.vision_tokenizer\.layers\.(\d+)\.1\.3\.", r"model.token_sampler.layers.\1.ff.fc2."),
    (r"^vlm\.vision_tokenizer\.", "model.token_sampler."),
    (r"^vlm\.lang_model\.model\.", "model.language_model."),
    (r"^vlm\.lang_model\.lm_head\.", "lm_head."),
]
_OURS_TO_OFFICIAL = [
    (r"^model\.vision_tower\.", "vlm.vision_encoder."),
    (r"^model\.token_sampler\.layers\.(\d+)\.attn\.", r"vlm.vision_tokenizer.layers.\1.0."),
    (r"^model\.token_sampler\.layers\.(\d+)\.ff\.norm\.", r"vlm.vision_tokenizer.layers.\1.1.0."),
    (r"^model\.token_sampler\.layers\.(\d+)\.ff\.fc1\.", r"vlm.vision_tokenizer.layers.\1.1.1."),
    (r"^model\.token_sampler\.layers\.(\d+)\.ff\.fc2\.", r"vlm.vision_tokenizer.layers.\1.1.3."),
    (r"^model\.token_sampler\.", "vlm.vision_tokenizer."),
    (r"^model\.language_model\.", "vlm.lang_model.model."),
    (r"^lm_head\.", "vlm.lang_model.lm_head."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    raise KeyError(f"no rule maps checkpoint key {key!r}")


def official_key_to_ours(key: str) -> str:
    return _rename(key, _OFFICIAL_TO_OURS)


def our_key_to_official(key: str) -> str:
    return _rename(key, _OURS_TO_OFFICIAL)


# ---------------------------------------------------------------------------------------------------
# configs


def read_official_config(path: str | Path, **hub_kwargs) -> dict[str, Any] | None:
    """The official `config.json` of a folder or hub repo id, or None if it is not an xGen-MM checkpoint."""
    file = cached_file(
        str(path),
        "config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if file is None:
        return None
    config = json.loads(Path(file).read_text())
    return config if config.get("model_type") == OFFICIAL_MODEL_TYPE else None


def config_from_official(official: dict[str, Any]) -> Blip3Config:
    """An official `config.json` dict -> `Blip3Config` (defaults are those of the released remote code)."""
    vision = dict(official.get("vision_encoder_config") or {})
    sampler = dict(official.get("vision_tokenizer_config") or {})
    text = dict(official.get("text_config") or {})
    extras = official.get("xgenmm_fixture_extras") or {}

    siglip = dict(vision.get("siglip_vision_config") or {})
    if not siglip:
        name = vision.get("model_name", "google/siglip-so400m-patch14-384")
        if name not in KNOWN_VISION_TOWERS:
            raise ValueError(
                f"unknown vision tower {name!r}: add its SiglipVisionConfig as vision_encoder_config.siglip_vision_config"
            )
        siglip = dict(KNOWN_VISION_TOWERS[name])
    siglip["model_type"] = "siglip_vision_model"
    base = int(siglip.get("image_size", 384))

    if vision.get("image_aspect_ratio", "anyres") != "anyres":
        mode = "base"
    else:
        mode = "anyres-patch" if vision.get("anyres_patch_sampling", True) else "anyres-fixed"
    grids_px = vision.get("anyres_grids") or [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    grids = [[w // base, h // base] for w, h in grids_px]

    initial_len = int(text.pop("initial_tokenizer_len", 32012))
    text.pop("torch_dtype", None)
    text.setdefault("model_type", "phi3")
    ids = extras.get("special_tokens", {})
    return Blip3Config(
        vision_config=siglip,
        sampler_config=dict(
            input_dim=int(sampler.get("vis_feature_dim", 1152)),
            output_dim=int(sampler.get("lang_embedding_dim", 3072)),
            num_latents=int(sampler.get("num_vis_tokens", 128)),
            depth=int(sampler.get("depth", 6)),
            heads=int(sampler.get("heads", 16)),
            dim_head=int(sampler.get("dim_head", 96)),
            ff_mult=int(sampler.get("ff_mult", 4)),
        ),
        text_config=text,
        vision_token_mode=mode,
        anyres_grids=grids,
        stripe_regrouping=mode == "anyres-patch",  # the released models were trained with the stripe groups
        image_mean=extras.get("image_mean", [0.5, 0.5, 0.5]),
        image_std=extras.get("image_std", [0.5, 0.5, 0.5]),
        initial_tokenizer_len=initial_len,
        num_added_tokens=3,
        lm_head_bias=True,
        pad_token_id=ids.get("<pad>", initial_len - 1),  # the <pad> added just before initial_tokenizer_len
        image_token_id=ids.get("<image>", initial_len),
        image_placeholder_token_id=ids.get("<image placeholder>", initial_len + 1),
        end_of_chunk_token_id=ids.get("<|endofchunk|>", initial_len + 2),
        dtype=official.get("torch_dtype", official.get("dtype")),
    )


def config_to_official(config: Blip3Config) -> dict[str, Any]:
    """`Blip3Config` -> an official `config.json` dict that the released remote code would also accept."""
    if config.num_added_tokens != 3 or config.sampler_config.instruction_aware:
        raise ValueError("only the v1.5 layout (three added tokens, plain perceiver) has an official form")
    base = config.image_size
    text = config.text_config.to_dict()
    rope = text.pop("rope_parameters", None) or {}
    text["rope_theta"] = rope.get("rope_theta", 10000.0)
    text["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    for key in ("transformers_version", "architectures", "dtype", "_name_or_path"):
        text.pop(key, None)
    text["initial_tokenizer_len"] = config.initial_tokenizer_len
    siglip = config.vision_config.to_dict()
    for key in ("transformers_version", "architectures", "dtype", "_name_or_path"):
        siglip.pop(key, None)
    dtype = config.dtype
    return {
        "architectures": ["XGenMMModelForConditionalGeneration"],
        "model_type": OFFICIAL_MODEL_TYPE,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        "text_config": text,
        "vision_encoder_config": {
            "model_type": "xgenmm_vision_encoder",
            "anyres_grids": [[cols * base, rows * base] for cols, rows in config.anyres_grids],
            "anyres_patch_sampling": config.vision_token_mode == "anyres-patch",
            "image_aspect_ratio": "anyres" if config.vision_token_mode != "base" else "squash",
            "siglip_vision_config": siglip,
        },
        "vision_tokenizer_config": {
            "model_type": "xgenmm_vision_tokenizer",
            "vis_feature_dim": config.sampler_config.input_dim,
            "lang_embedding_dim": config.sampler_config.output_dim,
            "num_vis_tokens": config.sampler_config.num_latents,
            "image_aspect_ratio": "anyres",
            "depth": config.sampler_config.depth,
            "heads": config.sampler_config.heads,
            "dim_head": config.sampler_config.dim_head,
            "ff_mult": config.sampler_config.ff_mult,
        },
        "xgenmm_fixture_extras": {  # what the official file leaves to code defaults, kept for a faithful reload
            "image_mean": list(config.image_mean),
            "image_std": list(config.image_std),
            "special_tokens": {
                "<pad>": config.pad_token_id,
                "<image>": config.image_token_id,
                "<image placeholder>": config.image_placeholder_token_id,
                "<|endofchunk|>": config.end_of_chunk_token_id,
            },
        },
    }


# ---------------------------------------------------------------------------------------------------
# weights


def official_loading_kwargs(official_config: dict[str, Any]) -> dict[str, Any]:
    """What `from_pretrained` needs to read an official checkpoint: our config and the key renaming.

    transformers' loader does the rest (shards, dtype, device map, meta-device init); `use_safetensors`
    keeps it from ever unpickling a `.bin` file.
    """
    return {
        "config": config_from_official(official_config),
        "key_mapping": dict(_OFFICIAL_TO_OURS),
        "use_safetensors": True,
    }


def save_official(model, path: str | Path, max_shard_size: str | int = "5GB") -> None:
    """Write `model` in the official layout (config.json + `vlm.*` safetensors, sharded with an index if large)."""
    if model.config.sampler_config.tile_position_code:
        raise ValueError(
            "this model uses tile_position_code, which the official xGen-MM layout has no place for; "
            "save it in blip3's own format (save_pretrained) instead"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_official(model.config), indent=2, sort_keys=True) + "\n")
    state = {our_key_to_official(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, path, max_shard_size=max_shard_size, metadata={"format": "pt"})
