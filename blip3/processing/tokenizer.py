"""The tokenizer side of xGen-MM: its special tokens, and small offline tokenizers with Phi-3's layout.

Phi-3's vocabulary (REFERENCE §1.5) is 32,000 SentencePiece pieces followed by 11 added tokens at
ids 32000–32010. xGen-MM adds a `<pad>` (Phi-3 pads with its eos) and three special tokens:

    <pad> 32011    <image> 32012    <image placeholder> 32013    <|endofchunk|> 32014

`build_tokenizer` trains a tiny tokenizer of the same shape for tests and the CPU demo. It is
byte-level BPE (GPT-2 style) rather than Phi-3's SentencePiece: every text decodes back exactly,
leading spaces and all, with no unknown pieces. Its ids are laid out like Phi-3's: `<unk>` = 0,
`<s>` = 1, `</s>` = 2, then the 256 bytes in byte order (a newline is 13, Phi-3's `<0x0A>`), and with
`phi3_layout=True` every special id is the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER_TOKEN = "<image placeholder>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
XGENMM_SPECIAL_TOKENS = (IMAGE_TOKEN, IMAGE_PLACEHOLDER_TOKEN, END_OF_CHUNK_TOKEN)  # in the order they are added

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"  # ends every chat turn; instruct models stop on it
ENDOFTEXT_TOKEN = "<|endoftext|>"  # Phi-3's eos

UNK_TOKEN, BOS_TOKEN, EOS_PIECE = "<unk>", "<s>", "</s>"
PHI3_BASE_VOCAB_SIZE = 32000
# Phi-3's added tokens in id order, from 32000.
PHI3_ADDED_TOKENS = (
    ENDOFTEXT_TOKEN,
    ASSISTANT_TOKEN,
    *(f"<|placeholder{i}|>" for i in range(1, 5)),
    SYSTEM_TOKEN,
    END_TOKEN,
    "<|placeholder5|>",
    "<|placeholder6|>",
    USER_TOKEN,
)
CHAT_TOKENS = (ENDOFTEXT_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, END_TOKEN, USER_TOKEN)  # without the placeholders


def add_xgenmm_special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """Add xGen-MM's tokens to a tokenizer (in place, idempotent) and return the ids by role.

    As the original factory does: a `<pad>` when the tokenizer has no pad token or pads with its
    eos, then `<image>`, `<image placeholder>`, `<|endofchunk|>`. Returns the ids of `pad`, `image`,
    `image_placeholder`, `end_of_chunk`, `bos`, `eos` and the chat roles `system`, `user`,
    `assistant`, `end` (None for a role token the vocabulary lacks).
    """
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    missing = [token for token in XGENMM_SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return special_token_ids(tokenizer)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The ids of the xGen-MM and chat tokens by role (see `add_xgenmm_special_tokens`)."""
    vocab = tokenizer.get_vocab()
    roles = {
        "image": IMAGE_TOKEN,
        "image_placeholder": IMAGE_PLACEHOLDER_TOKEN,
        "end_of_chunk": END_OF_CHUNK_TOKEN,
        "system": SYSTEM_TOKEN,
        "user": USER_TOKEN,
        "assistant": ASSISTANT_TOKEN,
        "end": END_TOKEN,
    }
    ids = {role: vocab.get(token) for role, token in roles.items()}
    ids.update(pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    return ids


def build_tokenizer(texts: Iterable[str], vocab_size: int, phi3_layout: bool = False) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on `texts`, with Phi-3's special and chat tokens.

    `vocab_size` is the size of the base vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte symbols and
    the learned merges (fewer if `texts` are too small to learn that many). Phi-3's chat tokens come
    after it. With `phi3_layout=True` the base vocabulary is padded with never-produced `<unused…>`
    pieces to exactly 32,000 and all 11 of Phi-3's added tokens follow at 32000–32010, so
    `add_xgenmm_special_tokens` then assigns the real ids 32011–32014. Like Phi-3, it adds `<s>` at the
    start, and its eos `<|endoftext|>` is also its pad until xGen-MM's `<pad>` is added.
    """
    num_fixed = 3 + 256
    if vocab_size <= num_fixed:
        raise ValueError(f"vocab_size must exceed {num_fixed} (<unk>, <s>, </s> and the 256 byte symbols)")
    if phi3_layout and vocab_size > PHI3_BASE_VOCAB_SIZE:
        raise ValueError(f"with phi3_layout the base vocabulary holds at most {PHI3_BASE_VOCAB_SIZE} pieces")

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_PIECE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_model.train_from_iterator(texts, trainer)
    trained = json.loads(trainer_model.to_str())["model"]

    # Re-number as SentencePiece lays out Phi-3: specials, the bytes in byte order (so a newline is
    # 13, as Phi-3's <0x0A>), then the learned pieces in the order they were learned.
    pieces = [UNK_TOKEN, BOS_TOKEN, EOS_PIECE, *_byte_symbols()]
    fixed = set(pieces)
    pieces += [piece for piece, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if piece not in fixed]
    if phi3_layout:
        pieces += _unused_pieces(PHI3_BASE_VOCAB_SIZE - len(pieces), taken=set(pieces))
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [tuple(merge) for merge in trained["merges"]]

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    added = PHI3_ADDED_TOKENS if phi3_layout else CHAT_TOKENS
    specials = (UNK_TOKEN, BOS_TOKEN, EOS_PIECE, *added)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        add_bos_token=True,
        padding_side="right",
    )


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte value 0–255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _unused_pieces(count: int, taken: set[str]) -> list[str]:
    """`count` filler pieces. No merge produces them, so the BPE model never emits them."""
    pieces, index = [], 0
    while len(pieces) < count:
        piece = f"<unused{index}>"
        if piece not in taken:
            pieces.append(piece)
        index += 1
    return pieces
