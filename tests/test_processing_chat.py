"""The chat template (REFERENCE §3.1) and label masking (§3.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.processing.chat import IGNORE_INDEX, XGENMM_SYSTEM_PROMPT, encode, parse_conversation, render
from conftest import build_test_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from blip3 import add_xgenmm_special_tokens

    tokenizer = build_test_tokenizer()
    add_xgenmm_special_tokens(tokenizer)
    return tokenizer


def chat(*turns: str) -> list[dict]:
    """Alternating user/assistant messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def test_renders_exactly_the_reference_template():
    conversation = [{"role": "system", "content": "S"}, *chat("Q1", "A1", "Q2", "A2")]
    rendered = render(parse_conversation(conversation))
    assert rendered.text == (
        "<|system|>\nS<|end|>\n"
        "<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n"
        "<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n"
    )
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == ["A1<|end|>\n", "A2<|end|>\n"]


def test_system_prompt_default_override_and_none():
    default = render(parse_conversation(chat("Q", "A"))).text
    assert default.startswith(f"<|system|>\n{XGENMM_SYSTEM_PROMPT}<|end|>\n<|user|>\nQ<|end|>\n")
    assert XGENMM_SYSTEM_PROMPT == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    assert render(parse_conversation(chat("Q", "A"), system_prompt="Be brief.")).text.startswith(
        "<|system|>\nBe brief.<|end|>"
    )
    assert render(parse_conversation(chat("Q", "A"), system_prompt=None)).text.startswith("<|user|>\nQ<|end|>")


def test_generation_prompt_ends_with_the_assistant_header():
    text = render(parse_conversation(chat("Q"), system_prompt=None, for_generation=True)).text
    assert text == "<|user|>\nQ<|end|>\n<|assistant|>\n"


def test_image_parts_and_llava_turns_render_alike():
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "\nWhat is this and this "},
                {"type": "image"},
                {"type": "text", "text": "?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Two shapes."}]},
    ]
    llava = [
        {"from": "human", "value": "<image>\nWhat is this and this <image>?"},
        {"from": "gpt", "value": "Two shapes."},
    ]
    assert render(parse_conversation(parts)) == render(parse_conversation(llava))
    assert "<|user|>\n<image>\nWhat is this and this <image>?<|end|>" in render(parse_conversation(llava)).text


@pytest.mark.parametrize(
    "conversation, for_generation, problem",
    [
        (chat("Q", "A", "Q2"), False, "must end with a 'assistant' turn"),
        (chat("Q", "A"), True, "must end with a 'user' turn"),
        ([], False, "must end with"),
        ([{"role": "assistant", "content": "A"}], False, "message 0 is a 'assistant' turn where a 'user'"),
        (
            [*chat("Q"), {"role": "user", "content": "Q again"}, {"role": "assistant", "content": "A"}],
            False,
            "message 1 is a 'user' turn",
        ),
        ([*chat("Q", "A"), {"role": "system", "content": "S"}], True, "message 2 is a 'system' turn"),
        ([{"role": "narrator", "content": "x"}], False, "unknown role 'narrator'"),
        ([{"from": "bot", "value": "x"}], False, "unknown role 'bot'"),
        ([{"text": "x"}], False, "neither 'role' nor 'from'"),
        ([{"role": "user", "content": [{"type": "video"}]}], True, "parts must be"),
        ([{"role": "user", "content": None}], True, "content must be a string or a list of parts"),
    ],
)
def test_malformed_conversations_are_refused(conversation, for_generation, problem):
    with pytest.raises(ValueError, match=problem):
        parse_conversation(conversation, for_generation=for_generation)


def test_labels_cover_exactly_the_answers(tokenizer):
    encoded = encode(
        tokenizer, parse_conversation([*chat("What is it? <image>", "A red circle.", "And now?", "Nothing.")])
    )
    assert len(encoded.labels) == len(encoded.input_ids)
    labelled = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    assert tokenizer.decode(labelled) == "A red circle.<|end|>\nNothing.<|end|>\n"
    assert encoded.labels[0] == IGNORE_INDEX  # BOS
    assert tokenizer.convert_tokens_to_ids("<image>") in encoded.input_ids


# Words from the corpus, odd spacing, newlines, non-ASCII and <image> markers in user turns.
words = st.sampled_from(["the", "image", "red", " circle", "  ", "\n", "?", "Ünïcödé", "数字", "🙂", "x", "."])
texts = st.lists(words, max_size=8).map("".join)
questions = st.lists(st.one_of(words, st.just("<image>")), max_size=8).map("".join)


@given(exchanges=st.lists(st.tuples(questions, texts), min_size=1, max_size=4), system=st.one_of(st.none(), texts))
@settings(max_examples=150, deadline=None)
def test_labels_of_random_conversations(tokenizer, exchanges, system):
    conversation = [message for question, answer in exchanges for message in chat(question, answer)]
    encoded = encode(tokenizer, parse_conversation(conversation, system_prompt=system))
    # An independent account of the answers' tokens, answer by answer: each answer tokenised after its
    # `<|assistant|>\n` header (then the header's two tokens dropped), then `<|end|>` and its newline.
    end, newline = tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"]
    expected = []
    for _, answer in exchanges:
        expected += tokenizer("<|assistant|>\n" + answer, add_special_tokens=False)["input_ids"][2:] + [end, newline]
    assert [label for label in encoded.labels if label != IGNORE_INDEX] == expected
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
