"""Splicing: each `<image>` token is replaced by its image's vision tokens (REFERENCE §1.6).

The k-th `<image>` of a sample takes the sample's k-th image. Vision positions get attention 1 and
label −100. Samples are re-padded to the longest: on the right for training, on the left for
generation. Padding is read from the attention mask of the input, so either side goes in.

A sample whose `<image>` count differs from its number of images is an error, never a silent shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip3.config import IGNORE_INDEX


@dataclass
class SplicedInputs:
    inputs_embeds: torch.Tensor  # [B, N, d]
    attention_mask: torch.Tensor  # [B, N] long, 0 on padding
    position_ids: torch.Tensor  # [B, N], 0… over each sample's tokens
    labels: torch.Tensor | None  # [B, N], −100 on vision tokens and padding
    vision_mask: torch.Tensor  # [B, N] bool, True on vision tokens


def splice_vision_tokens(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_tokens: list[list[torch.Tensor]],
    image_token_id: int,
    padding_side: str = "right",
) -> SplicedInputs:
    """input_ids [B, T] with one `<image>` per image; text_embeds [B, T, d]; image_tokens[b][k] [n_k, d]."""
    batch = input_ids.shape[0]
    if len(image_tokens) != batch:
        raise ValueError(f"got images for {len(image_tokens)} samples but the batch has {batch}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()

    sequences, label_rows, vision_rows = [], [], []
    for b in range(batch):
        ids, embeds = input_ids[b][valid[b]], text_embeds[b][valid[b]]
        slots = (ids == image_token_id).nonzero().flatten().tolist()
        images = image_tokens[b]
        if len(slots) != len(images):
            raise ValueError(
                f"sample {b}: {len(slots)} <image> token(s) in the text but {len(images)} image(s) given; "
                "each image needs exactly one <image> token (was the text truncated?)"
            )
        pieces, is_vision, start = [], [], 0
        for slot, vision in zip(slots, images):
            pieces += [embeds[start:slot], vision.to(embeds.dtype)]
            is_vision += [torch.zeros(slot - start, dtype=torch.bool), torch.ones(len(vision), dtype=torch.bool)]
            start = slot + 1  # the <image> token itself is dropped
        pieces.append(embeds[start:])
        is_vision.append(torch.zeros(len(ids) - start, dtype=torch.bool))
        sequences.append(torch.cat(pieces))
        vision = torch.cat(is_vision).to(ids.device)
        vision_rows.append(vision)
        if labels is not None:
            row = torch.full(vision.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            text_labels = labels[b][valid[b]]
            row[~vision] = text_labels[ids != image_token_id]
            label_rows.append(row)

    lengths = [len(s) for s in sequences]
    longest = max(lengths)

    def pad(rows: list[torch.Tensor], value) -> torch.Tensor:
        out = []
        for row in rows:
            extra = longest - len(row)
            widths = (0, 0) * (row.dim() - 1) + ((0, extra) if padding_side == "right" else (extra, 0))
            out.append(F.pad(row, widths, value=value))
        return torch.stack(out)

    # padded embedding rows are zeros (the original wrote the pad id's *value* there; it is masked either way)
    inputs_embeds = pad(sequences, 0.0)
    mask = pad([torch.ones(n, dtype=torch.long, device=input_ids.device) for n in lengths], 0)
    positions = pad([torch.arange(n, device=input_ids.device) for n in lengths], 1)
    return SplicedInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=positions,
        labels=pad(label_rows, IGNORE_INDEX) if labels is not None else None,
        vision_mask=pad(vision_rows, False),
    )
