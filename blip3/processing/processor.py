"""`Blip3Processor`: text with `<image>` markers (or conversations) plus images -> model inputs.

The text keeps ONE `<image>` token per image; the model replaces it with that image's vision tokens
(REFERENCE §1.6). The processor guards that step's invariants before any tensor is built: every
sample has exactly as many `<image>` tokens as images, and `max_length` is checked against the
*spliced* length (text tokens − images + each image's vision tokens). A truncation that would cut
into an image is an error, never a silent shift of images against their tokens.

Output (`BatchFeature`, torch tensors):
    input_ids, attention_mask [B, T]   padded right (training) or left (generation)
    labels [B, T]                      conversations for training only; -100 off the answers
    pixel_values [ΣNp, 3, S, S]        all tiles of all images, sample by sample, in `<image>` order
    image_sizes [N, 2]                 (W, H) of each image
    num_tiles [N], num_images [B]      how to split pixel_values per image and images per sample
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from blip3.config import IGNORE_INDEX, Blip3Config
from blip3.processing.anyres import count_vision_tokens
from blip3.processing.chat import XGENMM_SYSTEM_PROMPT, Conversation, Turn, encode, parse_conversation
from blip3.processing.image import Blip3ImageProcessor, ImageSource, is_image_source
from blip3.processing.tokenizer import add_xgenmm_special_tokens, special_token_ids

PaddingSide = Literal["left", "right"]
Truncation = Literal["error", "right", "drop_turns"]
Images = Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | None


@dataclass
class _Sample:
    input_ids: list[int]
    labels: list[int] | None
    images: list[Image.Image]


class Blip3Processor(ProcessorMixin):
    r"""Tokenizer + `Blip3ImageProcessor`, with the xGen-MM special tokens and chat template.

    num_latents: vision tokens per tile (the token sampler's latents), for the spliced lengths.

    Build one for a model with `Blip3Processor.from_config(config, tokenizer)`; save and load it with
    `save_pretrained` / `AutoProcessor.from_pretrained` (after `import blip3`).
    """

    def __init__(
        self,
        image_processor: Blip3ImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        num_latents: int,
        chat_template: str | None = None,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.num_latents = int(num_latents)
        ids = special_token_ids(tokenizer)
        if ids["image"] is None or ids["pad"] is None:
            raise ValueError(
                "the tokenizer lacks <image> or a pad token: call add_xgenmm_special_tokens(tokenizer) first"
            )
        self.image_token_id: int = ids["image"]
        self.pad_token_id: int = ids["pad"]
        self.end_token_id = ids["end"]
        # Never trained as targets (REFERENCE §3.2 step 4); `<image>` becomes vision tokens anyway.
        ignored = (ids["pad"], ids["image"], ids["image_placeholder"], ids["end_of_chunk"])
        self.ignored_label_ids = [token_id for token_id in ignored if token_id is not None]

    @classmethod
    def from_config(cls, config: Blip3Config, tokenizer: PreTrainedTokenizerBase) -> Blip3Processor:
        """The processor of a model: its tiling, normalisation and tokens per tile, with `tokenizer`.

        Adds the xGen-MM tokens to `tokenizer` and checks that their ids are the ones the model expects.
        """
        ids = add_xgenmm_special_tokens(tokenizer)
        expected = {
            "pad": config.pad_token_id,
            "image": config.image_token_id,
            "image_placeholder": config.image_placeholder_token_id,
            "end_of_chunk": config.end_of_chunk_token_id,
        }
        wrong = {role: (ids[role], expected_id) for role, expected_id in expected.items() if ids[role] != expected_id}
        if wrong:
            details = ", ".join(f"{role} {got} (config: {want})" for role, (got, want) in wrong.items())
            raise ValueError(f"the tokenizer's special ids differ from the model config's: {details}")
        image_processor = Blip3ImageProcessor.from_model_config(config)
        return cls(image_processor, tokenizer, num_latents=config.sampler_config.num_latents)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "num_tiles", "num_images"]

    def vision_tokens_per_image(self, image_size: tuple[int, int]) -> int:
        """LM positions an image of (W, H) `image_size` takes once its `<image>` is expanded."""
        processor = self.image_processor
        grids = tuple(map(tuple, processor.anyres_grids))
        return count_vision_tokens(
            image_size, processor.vision_token_mode, grids, processor.image_size, self.num_latents
        )

    # -----------------------------------------------------------------------------------------------
    # Entry points

    def __call__(
        self,
        text: str | Sequence[str],
        images: Images = None,
        *,
        padding_side: PaddingSide = "right",
        max_length: int | None = None,
        truncation: Literal["error", "right"] = "error",
    ) -> BatchFeature:
        """Tokenise text that already holds one `<image>` per image.

        images: for a single text, a flat list in `<image>` order; for a batch, one list per text.
        padding_side: "right" for training, "left" for batched generation.
        max_length: the most positions a sample may take after splicing; beyond it `truncation="error"`
            raises, `"right"` drops trailing text tokens (and raises rather than cut into an image).
        """
        if truncation not in ("error", "right"):
            raise ValueError(f"truncation must be 'error' or 'right', got {truncation!r}")
        texts = [text] if isinstance(text, str) else list(text)
        input_ids = self.tokenizer(texts)["input_ids"]
        samples = []
        for index, (ids, sample_images) in enumerate(zip(input_ids, self._images_per_sample(images, len(texts)))):
            sample = _Sample(ids, None, sample_images)
            self._check_image_count(index, sample)
            samples.append(self._truncate(index, sample, max_length, truncation))
        return self._collate(samples, padding_side)

    def process_conversations(
        self,
        conversations: Conversation | Sequence[Conversation],
        images: Images = None,
        *,
        add_generation_prompt: bool = False,
        system_prompt: str | None = XGENMM_SYSTEM_PROMPT,
        max_length: int | None = None,
        truncation: Truncation = "error",
        padding_side: PaddingSide | None = None,
    ) -> BatchFeature:
        """Render conversations with the chat template, tokenise them and label the answers.

        add_generation_prompt: each conversation ends with a user turn and the prompt with
            `<|assistant|>\\n`; no labels, left padding by default. Otherwise each ends with an assistant
            turn, `labels` are returned, right padding by default.
        system_prompt: the system turn added to conversations without one (None: none added).
        truncation: what to do with a sample longer than `max_length` after splicing: `"error"`,
            `"right"` (drop trailing tokens, never into an image) or `"drop_turns"` (drop whole
            trailing user/assistant exchanges, keeping at least the first). Generation prompts are
            never truncated: cutting one would change the question.
        """
        if truncation not in ("error", "right", "drop_turns"):
            raise ValueError(f"truncation must be 'error', 'right' or 'drop_turns', got {truncation!r}")
        if add_generation_prompt and truncation != "error":
            raise ValueError("generation prompts cannot be truncated; use truncation='error'")
        batch = [conversations] if _is_one_conversation(conversations) else list(conversations)
        samples = []
        for index, (conversation, sample_images) in enumerate(zip(batch, self._images_per_sample(images, len(batch)))):
            turns = parse_conversation(conversation, system_prompt, for_generation=add_generation_prompt)
            encoded = encode(self.tokenizer, turns)
            sample = _Sample(encoded.input_ids, None if add_generation_prompt else encoded.labels, sample_images)
            self._check_image_count(index, sample)
            if truncation == "drop_turns":
                sample = self._drop_turns(turns, sample, max_length)  # then any remaining excess is an error
            samples.append(self._truncate(index, sample, max_length, "right" if truncation == "right" else "error"))
        return self._collate(samples, padding_side or ("left" if add_generation_prompt else "right"))

    def decode_generated(self, generated_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Text of each row of generated ids, cut at the first `<|end|>` (or eos), special tokens removed."""
        rows = generated_ids.tolist() if isinstance(generated_ids, torch.Tensor) else generated_ids
        stops = {self.end_token_id, self.tokenizer.eos_token_id} - {None}
        texts = []
        for row in rows:
            end = next((position for position, token in enumerate(row) if token in stops), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts

    # -----------------------------------------------------------------------------------------------
    # Samples

    def _images_per_sample(self, images: Images, batch_size: int) -> list[list[Image.Image]]:
        """Loaded images, one list per sample."""
        if is_image_source(images):
            images = [images]
        if not images:
            return [[] for _ in range(batch_size)]
        if any(isinstance(item, (list, tuple)) for item in images):
            if len(images) != batch_size or not all(isinstance(item, (list, tuple)) for item in images):
                raise ValueError(f"for {batch_size} samples, images must be {batch_size} lists (one per sample)")
            per_sample = [list(sample_images) for sample_images in images]
        elif batch_size == 1:
            per_sample = [list(images)]
        else:
            raise ValueError(
                f"for {batch_size} samples, images must be {batch_size} lists (one per sample), not one flat list"
            )
        loaded = iter(self.image_processor.load([image for sample in per_sample for image in sample]))
        return [[next(loaded) for _ in sample] for sample in per_sample]

    def _check_image_count(self, index: int, sample: _Sample) -> None:
        num_tokens = sample.input_ids.count(self.image_token_id)
        if num_tokens != len(sample.images):
            raise ValueError(f"sample {index} has {num_tokens} <image> tokens but {len(sample.images)} images")

    def _spliced_length(self, sample: _Sample) -> int:
        vision = sum(self.vision_tokens_per_image(image.size) for image in sample.images)
        return len(sample.input_ids) - len(sample.images) + vision

    def _drop_turns(self, turns: list[Turn], sample: _Sample, max_length: int | None) -> _Sample:
        """Drop trailing user/assistant exchanges until the sample fits (the first always stays).

        Each shorter conversation is rendered and tokenised again rather than cut at a token index, so
        the result is exactly what that conversation alone would give.
        """
        first_exchange_end = 3 if turns[0].role == "system" else 2
        while max_length is not None and self._spliced_length(sample) > max_length and len(turns) > first_exchange_end:
            turns = turns[:-2]
            encoded = encode(self.tokenizer, turns)
            images = sample.images[: encoded.input_ids.count(self.image_token_id)]
            sample = _Sample(encoded.input_ids, encoded.labels, images)
        return sample

    def _truncate(self, index: int, sample: _Sample, max_length: int | None, truncation: str) -> _Sample:
        """Enforce `max_length` on the spliced length: raise, or drop trailing text tokens."""
        length = self._spliced_length(sample)
        if max_length is None or length <= max_length:
            return sample
        num_vision = length - len(sample.input_ids) + len(sample.images)
        counts = f"{len(sample.input_ids)} text tokens with {len(sample.images)} <image>, {num_vision} vision tokens"
        if truncation == "error":
            raise ValueError(
                f"sample {index} is {length} positions long after splicing ({counts}), over max_length={max_length}"
            )
        keep = max_length - (num_vision - len(sample.images))  # text tokens that fit beside all vision tokens
        positions = [p for p, token in enumerate(sample.input_ids) if token == self.image_token_id]
        if positions and keep <= positions[-1]:
            raise ValueError(
                f"sample {index} is {length} positions long after splicing ({counts}); truncating it to "
                f"max_length={max_length} would cut into image {len(positions) - 1} "
                f"(its <image> is token {positions[-1]})"
            )
        labels = sample.labels[:keep] if sample.labels is not None else None
        return _Sample(sample.input_ids[:keep], labels, sample.images)

    # -----------------------------------------------------------------------------------------------
    # Batch

    def _collate(self, samples: list[_Sample], padding_side: PaddingSide) -> BatchFeature:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(sample.input_ids) for sample in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.int64)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.int64)
        with_labels = samples[0].labels is not None
        for row, sample in enumerate(samples):
            length = len(sample.input_ids)
            columns = slice(0, length) if padding_side == "right" else slice(width - length, width)
            input_ids[row, columns] = torch.tensor(sample.input_ids, dtype=torch.int64)
            attention_mask[row, columns] = 1
            if with_labels:
                labels[row, columns] = torch.tensor(sample.labels, dtype=torch.int64)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            labels[torch.isin(input_ids, torch.tensor(self.ignored_label_ids))] = IGNORE_INDEX
            batch["labels"] = labels
        images = [image for sample in samples for image in sample.images]
        if images:
            batch.update(self.image_processor(images))
            batch["num_images"] = torch.tensor([len(sample.images) for sample in samples], dtype=torch.int64)
        return BatchFeature(batch)


def _is_one_conversation(conversations: Conversation | Sequence[Conversation]) -> bool:
    return len(conversations) > 0 and isinstance(conversations[0], Mapping)
