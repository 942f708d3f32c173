"""The offline tokenizer (Phi-3's layout) and xGen-MM's special tokens."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from blip3.processing.tokenizer import PHI3_ADDED_TOKENS, add_xgenmm_special_tokens, build_tokenizer
from conftest import CORPUS, build_test_tokenizer

PHI3_IDS = {
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|placeholder1|>": 32002,
    "<|placeholder4|>": 32005,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|placeholder5|>": 32008,
    "<|placeholder6|>": 32009,
    "<|user|>": 32010,
}


@pytest.fixture(scope="module")
def tokenizer():
    """Read-only: tests that add tokens build their own."""
    return build_test_tokenizer()


def test_phi3_layout_has_phi3s_ids(tokenizer):
    assert len(tokenizer) == 32011
    assert [tokenizer.convert_tokens_to_ids(token) for token in PHI3_ADDED_TOKENS] == list(range(32000, 32011))
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in PHI3_IDS} == PHI3_IDS
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("</s>")) == (0, 1, 2)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 32000  # Phi-3 pads with its eos
    ids = tokenizer("<|user|>\nhi<|end|>\n<|assistant|>\n")["input_ids"]
    assert ids[:3] == [1, 32010, 13] and ids[-4:] == [32007, 13, 32001, 13]  # <s>; a newline is 13 as in Phi-3


def test_xgenmm_tokens_get_the_released_ids_and_adding_is_idempotent():
    tokenizer = build_test_tokenizer()
    ids = add_xgenmm_special_tokens(tokenizer)
    assert ids == {
        "pad": 32011,
        "image": 32012,
        "image_placeholder": 32013,
        "end_of_chunk": 32014,
        "bos": 1,
        "eos": 32000,
        "system": 32006,
        "user": 32010,
        "assistant": 32001,
        "end": 32007,
    }
    assert len(tokenizer) == 32015
    assert add_xgenmm_special_tokens(tokenizer) == ids and len(tokenizer) == 32015
    # special: one id each, never split, dropped when decoding without special tokens
    encoded = tokenizer("a <image> b<image placeholder><|endofchunk|>", add_special_tokens=False)["input_ids"]
    assert [i for i in encoded if i >= 32011] == [32012, 32013, 32014]
    assert "<image>" not in tokenizer.decode(encoded, skip_special_tokens=True)


def test_a_tokenizer_with_its_own_pad_keeps_it():
    tokenizer = build_test_tokenizer(phi3_layout=False)
    tokenizer.add_special_tokens({"pad_token": "<mypad>"})
    ids = add_xgenmm_special_tokens(tokenizer)
    assert tokenizer.pad_token == "<mypad>" and ids["pad"] == tokenizer.convert_tokens_to_ids("<mypad>")
    assert ids["image"] == len(tokenizer) - 3


def test_compact_layout():
    tokenizer = build_test_tokenizer(phi3_layout=False)
    base = len(tokenizer) - 5  # the chat tokens follow the base vocabulary
    assert base <= 600
    assert [
        tokenizer.convert_tokens_to_ids(t)
        for t in ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    ] == list(range(base, base + 5))
    ids = add_xgenmm_special_tokens(tokenizer)
    assert [ids["pad"], ids["image"], ids["image_placeholder"], ids["end_of_chunk"]] == list(range(base + 5, base + 9))


def test_builds_fast():
    start = time.perf_counter()
    build_tokenizer(CORPUS * 50, vocab_size=2000, phi3_layout=True)
    assert time.perf_counter() - start < 2


def test_vocab_size_must_hold_the_byte_pieces():
    with pytest.raises(ValueError, match="byte symbols"):
        build_tokenizer(CORPUS, vocab_size=200)
    with pytest.raises(ValueError, match="32000"):
        build_tokenizer(CORPUS, vocab_size=40000, phi3_layout=True)


# Any text but "<", which could spell a special token such as "<s>".
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<"), max_size=60)


@given(text=texts)
@settings(max_examples=200, deadline=None)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_save_and_load_offline(tmp_path):
    tokenizer = build_test_tokenizer()
    add_xgenmm_special_tokens(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|system|>\nsys<|end|>\n<|user|>\n<image> What is it? 🙂<|end|>\n<|assistant|>\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert add_xgenmm_special_tokens(loaded) == add_xgenmm_special_tokens(tokenizer)
    assert len(loaded) == 32015
