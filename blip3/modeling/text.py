"""Input embedding and output head with separate rows for the added xGen-MM tokens (REFERENCE §1.5).

The released models keep the LM's own tables (32,064 rows for Phi-3) untouched and store the three
added tokens (`<image>`, `<image placeholder>`, `<|endofchunk|>`) in extra rows. Ids below
`num_base` read the LM's table; ids from `num_base` on read the extra rows. The head predicts the
first `num_base` ids from the LM's head (rows past it are never used) and the added ids from its own
small linear layer. Both the head and its extra layer carry a bias in the released checkpoints.

Parameter names match the released checkpoints (`weight`, `additional_embedding`, `bias`,
`additional_fc`), so converted weights load without renaming inside these modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecoupledEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, num_base: int, num_added: int, padding_idx: int | None):
        super().__init__(num_embeddings, embedding_dim)
        # kept for `_init_weights` only: it zeroes this row; `forward` passes no padding_idx
        self.padding_idx = padding_idx if padding_idx is not None and padding_idx < num_base else None
        self.num_base = num_base
        self.additional_embedding = nn.Embedding(num_added, embedding_dim) if num_added else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.additional_embedding is None:
            return F.embedding(input_ids, self.weight)
        is_added = input_ids >= self.num_base
        # both lookups on every id, then a select: no data-dependent branch, one kernel each
        base = F.embedding(input_ids.masked_fill(is_added, 0), self.weight)
        added = self.additional_embedding(torch.where(is_added, input_ids - self.num_base, 0))
        return torch.where(is_added.unsqueeze(-1), added, base)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, num_base={self.num_base}"


class DecoupledLMHead(nn.Linear):
    """Logits over `num_base + num_added` ids from a head whose own table may have more rows."""

    def __init__(self, hidden_size: int, num_rows: int, num_base: int, num_added: int, bias: bool):
        super().__init__(hidden_size, num_rows, bias=bias)
        self.num_base = num_base
        self.additional_fc = nn.Linear(hidden_size, num_added) if num_added else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # slicing the weight rows is a view: no copy of the table, and the unused rows cost nothing
        bias = self.bias[: self.num_base] if self.bias is not None else None
        logits = F.linear(hidden_states, self.weight[: self.num_base], bias)
        if self.additional_fc is None:
            return logits
        return torch.cat([logits, self.additional_fc(hidden_states)], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_base={self.num_base}"
