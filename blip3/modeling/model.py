"""The blip3 vision-language model: frozen SigLIP → token sampler → `<image>` splice → causal LM.

    pixel_values [ΣNp, 3, S, S]   every tile of every image of the batch
         │  vision tower (frozen, no grad)                  REFERENCE §1.2
         ▼
    features [ΣNp, g·g, d_vis]
         │  any-res grouping + letterbox masks              REFERENCE §2.3 (modeling/anyres.py)
         ▼
    token sampler (perceiver resampler)                     REFERENCE §1.3 (modeling/sampler.py)
         │
         ▼
    vision tokens per image [n_k, d_llm]
         │  splice at the k-th <image> of each sample       REFERENCE §1.6 (modeling/splice.py)
         ▼
    causal LM ─► hidden states ─► decoupled head ─► logits / text-only loss

`Blip3Model` is everything up to the LM's hidden states; `Blip3ForConditionalGeneration` adds the
head, the loss and `generate()`. Both follow transformers' conventions (`from_pretrained`,
`save_pretrained`, `generate`, gradient checkpointing, sdpa), so PEFT, TRL and accelerate take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from blip3.config import IGNORE_INDEX, Blip3Config
from blip3.interop.xgenmm import official_loading_kwargs, read_official_config
from blip3.modeling.anyres import group_anyres_patches, merge_anyres_fixed
from blip3.modeling.loss import linear_cross_entropy
from blip3.modeling.sampler import TokenSampler
from blip3.modeling.splice import SplicedInputs, splice_vision_tokens
from blip3.modeling.text import DecoupledEmbedding, DecoupledLMHead


@dataclass
class Blip3ModelOutput(BaseModelOutputWithPast):
    attention_mask: torch.Tensor | None = None  # over the spliced sequence
    labels: torch.Tensor | None = None  # spliced labels (−100 on vision tokens), when labels were given


@dataclass
class Blip3CausalLMOutput(CausalLMOutputWithPast):
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class ImageBatch:
    """All images of a batch, flattened: tiles in sample order, then image order."""

    pixel_values: torch.Tensor  # [ΣNp, 3, S, S]
    image_sizes: list[tuple[int, int]]  # (W, H) per image
    num_tiles: list[int]  # per image
    num_images: list[int]  # per sample


def supervised_targets(labels: torch.Tensor, ignored_ids: list[int]) -> torch.Tensor:
    """bool [B, T-1]: which next-token targets the loss trains on (not −100, not pad or an added special token).

    Counting them on the unspliced labels gives the same number as on the spliced ones: an image's
    vision tokens replace its `<image>`, whose label is never trained.
    """
    targets = labels[:, 1:]
    return (targets != IGNORE_INDEX) & ~torch.isin(targets, torch.tensor(ignored_ids, device=labels.device))


class Blip3PreTrainedModel(PreTrainedModel):
    config: Blip3Config
    config_class = Blip3Config
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerceiverLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TokenSampler):  # runs after its children: this overrides their N(0, 0.02)
            init.normal_(module.latents, mean=0.0, std=1.0)  # the original draws the latents from N(0, 1)
            # The original builds the perceiver from plain nn.Linear layers and never re-initialises them:
            # PyTorch's Kaiming-uniform defaults. N(0, 0.02) would make the attention branch ~30x smaller
            # than the N(0, 1) latents, so a fresh sampler's output would hardly depend on the image.
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                    if layer.bias is not None:
                        bound = 1 / math.sqrt(layer.in_features)
                        init.uniform_(layer.bias, -bound, bound)


class Blip3Model(Blip3PreTrainedModel):
    def __init__(self, config: Blip3Config):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower.requires_grad_(False)  # frozen in every stage of the recipe
        self.token_sampler = TokenSampler(config.sampler_config)
        self.language_model = AutoModel.from_config(config.text_config)
        text = config.text_config
        self.language_model.set_input_embeddings(
            DecoupledEmbedding(
                text.vocab_size,
                text.hidden_size,
                config.initial_tokenizer_len,
                config.num_added_tokens,
                padding_idx=config.pad_token_id,
            )
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # -- vision ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, g·g, d_vis]: SigLIP's last hidden state after its post-layernorm.

        The tower's attention-pooling head ships in the checkpoints but its output is unused, so it is skipped.
        """
        tower = self.vision_tower
        hidden = tower.embeddings(pixel_values.to(tower.dtype))
        hidden = tower.encoder(inputs_embeds=hidden).last_hidden_state
        return tower.post_layernorm(hidden)

    def get_image_features(
        self, images: ImageBatch, instructions: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Vision tokens per image, each [n_k, d_llm], in batch order.

        `instructions` (instruction-aware sampler only): per image, the LM input embeddings of its sample's prompt.
        """
        cfg = self.config
        cells = cfg.feature_grid
        features = self.encode_tiles(images.pixel_values).split(images.num_tiles)  # per image [Np, g·g, d]
        mode = cfg.vision_token_mode

        if mode == "anyres-fixed":  # one variable-length sequence per image, resampled once
            media = [
                merge_anyres_fixed(f, size, cfg.image_grid(size), cells) if len(f) > 1 else f[0]
                for f, size in zip(features, images.image_sizes)
            ]
            lengths = torch.tensor([len(m) for m in media], device=features[0].device)
            media_mask = torch.arange(int(lengths.max()), device=lengths.device)[None] < lengths[:, None]
            media = nn.utils.rnn.pad_sequence(media, batch_first=True)
            tiles_per_group = [1] * len(features)
        else:  # anyres-patch and base: every tile is resampled on its own
            groups, masks = [], []
            for f, size in zip(features, images.image_sizes):
                if len(f) == 1:  # a single view (base mode): nothing is letterboxed
                    groups.append(f)
                    masks.append(torch.ones(f.shape[:2], dtype=torch.bool, device=f.device))
                else:
                    g, m = group_anyres_patches(f, size, cfg.image_grid(size), cells, cfg.stripe_regrouping)
                    groups.append(g)
                    masks.append(m)
            media, media_mask = torch.cat(groups), torch.cat(masks)
            tiles_per_group = images.num_tiles

        instruction, instruction_mask = None, None
        if instructions is not None:
            per_row = [t for t, n in zip(instructions, tiles_per_group) for _ in range(n)]
            instruction = nn.utils.rnn.pad_sequence(per_row, batch_first=True)
            lengths = torch.tensor([len(t) for t in per_row], device=instruction.device)
            instruction_mask = torch.arange(instruction.shape[1], device=lengths.device)[None] < lengths[:, None]

        media_mask = None if bool(media_mask.all()) else media_mask  # lets SDPA take its unmasked kernel
        tokens = self.token_sampler(media, media_mask, instruction, instruction_mask)  # [rows, q, d_llm]
        per_image = tokens.split(tiles_per_group)
        if cfg.sampler_config.tile_position_code:
            per_image = [
                self.token_sampler.locate(t, cfg.image_grid(size) if len(t) > 1 else None)
                for t, size in zip(per_image, images.image_sizes)
            ]
        return [t.flatten(0, 1) for t in per_image]

    # -- inputs ------------------------------------------------------------------------------------

    def collect_images(
        self, input_ids: torch.Tensor, pixel_values, image_sizes, num_images=None, num_tiles=None
    ) -> ImageBatch:
        """Accept the processor's flat tensors or the original's nested lists (sample → image → [Np, 3, S, S])."""
        if isinstance(pixel_values, (list, tuple)):  # nested: one list of per-image tile tensors per sample
            if len(pixel_values) != input_ids.shape[0]:
                raise ValueError(
                    f"pixel_values lists images for {len(pixel_values)} samples, input_ids has {input_ids.shape[0]}"
                )
            per_image = [p.reshape(-1, *p.shape[-3:]) for sample in pixel_values for p in sample]  # drops a leading 1
            num_images = [len(sample) for sample in pixel_values]
            num_tiles = [len(p) for p in per_image]
            image_sizes = [size for sample in image_sizes for size in sample]
            pixel_values = torch.cat(per_image) if per_image else None
        image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        if num_images is None:  # bind images to samples by their <image> counts
            num_images = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
            if sum(num_images) != len(image_sizes):
                raise ValueError(f"{sum(num_images)} <image> tokens in the batch but {len(image_sizes)} images given")
        num_images = [int(n) for n in num_images]
        expected_tiles = [self.config.num_tiles(size) for size in image_sizes]
        num_tiles = expected_tiles if num_tiles is None else [int(n) for n in num_tiles]
        for k, (got, want, size) in enumerate(zip(num_tiles, expected_tiles, image_sizes)):
            if got != want:
                raise ValueError(
                    f"image {k} of size (W, H) = {size} has {got} tiles; mode {self.config.vision_token_mode!r} expects {want}"
                )
        if pixel_values is not None and len(pixel_values) != sum(num_tiles):
            raise ValueError(f"pixel_values holds {len(pixel_values)} tiles but the images need {sum(num_tiles)}")
        return ImageBatch(pixel_values, image_sizes, num_tiles, num_images)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values=None,
        image_sizes=None,
        num_images=None,
        num_tiles=None,
        padding_side: str = "right",
    ) -> SplicedInputs:
        """Token ids (one `<image>` per image) + images -> the LM's input embeddings, mask, positions, labels."""
        text_embeds = self.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        images = None
        if pixel_values is not None:
            images = self.collect_images(input_ids, pixel_values, image_sizes, num_images, num_tiles)
            if len(images.num_images) != batch:
                raise ValueError(f"num_images covers {len(images.num_images)} samples, the batch has {batch}")
        if images is not None and images.image_sizes:
            instructions = None
            if self.config.sampler_config.instruction_aware:
                instructions = self.instruction_embeddings(text_embeds, attention_mask, images.num_images)
            tokens = iter(self.get_image_features(images, instructions))
            per_sample = [[next(tokens) for _ in range(n)] for n in images.num_images]
        return splice_vision_tokens(
            input_ids, text_embeds, attention_mask, labels, per_sample, self.config.image_token_id, padding_side
        )

    def instruction_embeddings(self, text_embeds, attention_mask, num_images) -> list[torch.Tensor]:
        """Per image, the first `max_instruction_tokens` embeddings of its sample's text (REFERENCE §1.4)."""
        limit = self.config.sampler_config.max_instruction_tokens
        valid = (
            attention_mask.bool() if attention_mask is not None else torch.ones(text_embeds.shape[:2], dtype=torch.bool)
        )
        return [text_embeds[b][valid[b]][:limit] for b, n in enumerate(num_images) for _ in range(n)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values=None,
        image_sizes=None,
        num_images=None,
        num_tiles=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Blip3ModelOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            decoding = cache is not None and cache.get_seq_length() > 0
            if pixel_values is None and not decoding and bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("input_ids hold <image> tokens but no pixel_values were given")
            if not decoding:  # prefill or training: splice (a no-op without images) and re-pad on the right
                spliced = self.embed_inputs(
                    input_ids, attention_mask, labels, pixel_values, image_sizes, num_images, num_tiles
                )
                inputs_embeds, attention_mask, labels = spliced.inputs_embeds, spliced.attention_mask, spliced.labels
                position_ids = spliced.position_ids if position_ids is None else position_ids
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids)
        elif pixel_values is not None:
            raise ValueError("pass images with input_ids, not with inputs_embeds (those are already spliced)")

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return Blip3ModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            labels=labels,
        )


class Blip3ForConditionalGeneration(Blip3PreTrainedModel, GenerationMixin):
    def __init__(self, config: Blip3Config):
        super().__init__(config)
        self.model = Blip3Model(config)
        text = config.text_config
        self.lm_head = DecoupledLMHead(
            text.hidden_size,
            text.vocab_size,
            config.initial_tokenizer_len,
            config.num_added_tokens,
            config.lm_head_bias,
        )
        self.post_init()
        # instruct models end a turn with <|end|>, not the LM's eos (REFERENCE §9 item 6)
        self.generation_config.eos_token_id = list(config.stop_token_ids)
        self.generation_config.pad_token_id = config.pad_token_id
        self.generation_config.bos_token_id = config.bos_token_id

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also reads the released xGen-MM checkpoints (official layout, `vlm.*` keys) — no remote code."""
        official = read_official_config(pretrained_model_name_or_path) if kwargs.get("config") is None else None
        if official is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = super().from_pretrained(
            pretrained_model_name_or_path, *args, **official_loading_kwargs(official), **kwargs
        )
        # transformers replays the load-time renaming backwards on save; ours must save under our own names
        model._weight_conversions = None
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values=None,
        image_sizes=None,
        num_images=None,
        num_tiles=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> Blip3CausalLMOutput:
        r"""
        input_ids: token ids with ONE `<image>` id per image; the model expands it to the image's vision tokens.
        pixel_values: all tiles `[ΣNp, 3, S, S]` (with `image_sizes` `[N, 2]` as (W, H), and optionally
            `num_images` per sample and `num_tiles` per image), or nested lists sample → image → `[Np, 3, S, S]`.
        labels: like `input_ids`; the loss covers text only (vision, pad and the added special tokens are ignored).
        return_logits: defaults to True unless training with labels: the loss computes logits only at the
            supervised positions, and a full `[B, N, V]` tensor is then wasted memory.
        num_items_in_batch: normaliser of the summed loss for gradient accumulation (default: supervised tokens here).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            num_images=num_images,
            num_tiles=num_tiles,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = self.text_loss(hidden_states, outputs.labels, num_items_in_batch) if labels is not None else None
        if return_logits is None:
            return_logits = labels is None or not self.training
        logits = None
        if return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep])
        return Blip3CausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            labels=outputs.labels,
        )

    def text_loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy over the supervised positions only (mean, or sum / `num_items_in_batch`)."""
        targets = labels[:, 1:]
        supervised = supervised_targets(labels, self.config.ignored_label_ids)
        head, added = self.lm_head, self.lm_head.additional_fc
        loss = linear_cross_entropy(  # logits only at supervised positions, never all at once
            hidden_states[:, :-1][supervised],
            head.weight,
            head.bias,
            added.weight if added is not None else None,
            added.bias if added is not None else None,
            targets[supervised],
            head.num_base,
        )
        if num_items_in_batch is None:
            num_items_in_batch = supervised.sum().clamp(min=1)
        return loss / num_items_in_batch

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values=None,
        image_sizes=None,
        num_images=None,
        num_tiles=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Greedy/sampled generation with KV cache; returns only the new tokens, as the original.

        The prompt (any padding side in) is spliced and left-padded once; transformers' generation loop then
        runs on the LM with the cache, so streamers, stopping criteria and logits processors all apply.
        """
        if inputs_embeds is None:
            spliced = self.model.embed_inputs(
                input_ids, attention_mask, None, pixel_values, image_sizes, num_images, num_tiles, padding_side="left"
            )
            inputs_embeds, attention_mask = spliced.inputs_embeds, spliced.attention_mask
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


__all__ = ["Blip3ForConditionalGeneration", "Blip3Model", "Blip3PreTrainedModel", "ImageBatch", "supervised_targets"]
