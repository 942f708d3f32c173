"""The world's tokenizer: byte-level BPE trained on the world's own text, with the chat and xGen-MM tokens.

Its vocabulary is a few hundred pieces (the world says little), so the language model's tables stay
tiny. The OCR strings are left out of the training text: with no merges learned among capital letters,
every letter of a string is one token, which is what a small model reads and spells most easily.

Layout (see `blip3.processing.tokenizer.build_tokenizer`): `<unk>` 0, `<s>` 1, `</s>` 2, the 256 bytes,
the learned pieces; then `<|endoftext|>`, `<|assistant|>`, `<|system|>`, `<|end|>`, `<|user|>`; then
`<pad>`, `<image>`, `<image placeholder>`, `<|endofchunk|>` added by `add_xgenmm_special_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from blip3.processing.tokenizer import add_xgenmm_special_tokens, build_tokenizer
from blip3.synthetic.world import TEXT_ALPHABET

DEFAULT_VOCAB_SIZE = 640
# A rendered string: two or more of the text alphabet's capitals (the world's prose has no such word).
OCR_STRING = re.compile(rf"\b[{TEXT_ALPHABET}]{{2,}}\b")


def tokenizer_corpus(texts: Iterable[str]) -> list[str]:
    """The texts with every OCR string removed."""
    return [OCR_STRING.sub("", text) for text in texts]


def build_world_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tokenizer on the world's text and add the xGen-MM tokens (`<pad>` right before `<image>`)."""
    tokenizer = build_tokenizer(tokenizer_corpus(texts), vocab_size=vocab_size, phi3_layout=False)
    add_xgenmm_special_tokens(tokenizer)
    return tokenizer


def load_world_tokenizer(world_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer `build_world` saved in `world_dir/tokenizer`."""
    return AutoTokenizer.from_pretrained(Path(world_dir) / "tokenizer")
