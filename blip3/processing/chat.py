"""Conversations: the xGen-MM chat template (REFERENCE §3.1) and its label mask (§3.2).

A conversation is a list of messages, either chat style

    {"role": "system" | "user" | "assistant", "content": "text" | [parts]}
    parts: {"type": "text", "text": "..."} or {"type": "image"} (the `<image>` token at that place)

or LLaVA style, as in the SFT json files (§5.1): {"from": "system" | "human" | "gpt", "value": "text"}.
Parts are joined as they are: whitespace around an image is the caller's choice.

Rendered (Phi-3 style; the tokenizer adds the `<s>`):

    <|system|>\\nS<|end|>\\n<|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n<|user|>\\n…

A user turn always ends with the `<|assistant|>\\n` header, so a conversation that ends with a user
turn is a generation prompt. Labels cover only each answer, its `<|end|>` and the newline after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from blip3.config import IGNORE_INDEX
from blip3.processing.tokenizer import ASSISTANT_TOKEN, END_TOKEN, IMAGE_TOKEN, SYSTEM_TOKEN, USER_TOKEN

XGENMM_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Message = Mapping[str, Any]
Conversation = Sequence[Message]

_LLAVA_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str  # with `<image>` where the images go


def parse_conversation(
    conversation: Conversation, system_prompt: str | None = XGENMM_SYSTEM_PROMPT, for_generation: bool = False
) -> list[Turn]:
    """Validated turns: an optional system turn, then user and assistant turns alternating.

    `system_prompt` is added as the system turn when the conversation has none (None: no system turn).
    A generation prompt must end with a user turn, a training conversation with an assistant turn.
    """
    turns = [_turn(message, index) for index, message in enumerate(conversation)]
    if turns and turns[0].role == "system":
        system, dialogue = turns[:1], turns[1:]
    else:
        system, dialogue = ([Turn("system", system_prompt)] if system_prompt is not None else []), turns
    for index, turn in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            position = index + (len(turns) - len(dialogue))
            raise ValueError(
                f"message {position} is a {turn.role!r} turn where a {expected!r} turn was expected: after an "
                f"optional system turn, user and assistant turns must alternate, starting with the user"
            )
    last = "user" if for_generation else "assistant"
    if not dialogue or dialogue[-1].role != last:
        purpose = "a generation prompt" if for_generation else "a training conversation"
        raise ValueError(f"{purpose} must end with a {last!r} turn")
    return system + dialogue


def _turn(message: Message, index: int) -> Turn:
    if "role" in message:
        role, content = message["role"], message.get("content")
    elif "from" in message:
        role, content = _LLAVA_ROLES.get(message["from"], message["from"]), message.get("value")
    else:
        raise ValueError(f"message {index} has neither 'role' nor 'from': {dict(message)!r}")
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"message {index} has an unknown role {role!r}")
    return Turn(role, _content_text(content, index))


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ValueError(f"message {index}: content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(part["text"])
        elif kind == "image":
            texts.append(IMAGE_TOKEN)
        else:
            raise ValueError(
                f"message {index}: parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {part!r}"
            )
    return "".join(texts)


@dataclass(frozen=True)
class RenderedConversation:
    text: str
    answer_spans: list[tuple[int, int]]  # [start, end) character spans that are trained on


def render(turns: Sequence[Turn]) -> RenderedConversation:
    """The chat-template string of validated `turns`, and where the assistant answers lie in it."""
    text, spans = "", []
    for turn in turns:
        if turn.role == "system":
            text += f"{SYSTEM_TOKEN}\n{turn.text}{END_TOKEN}\n"
        elif turn.role == "user":
            text += f"{USER_TOKEN}\n{turn.text}{END_TOKEN}\n{ASSISTANT_TOKEN}\n"
        else:
            start = len(text)
            text += f"{turn.text}{END_TOKEN}\n"
            spans.append((start, len(text)))
    return RenderedConversation(text, spans)


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the answers


def encode(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn]) -> EncodedConversation:
    """Token ids and labels of validated `turns` (the tokenizer adds its BOS).

    The rendered string is tokenised once, and a token is labelled when its characters lie inside an
    answer span. Tokenising turn by turn (as the original does) can give different tokens at the
    joins than tokenising the whole, silently shifting labels; the original then has to detect the
    mismatch and mask the whole sample.
    """
    rendered = render(turns)
    encoding = tokenizer(rendered.text, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    inside = np.zeros(len(input_ids), dtype=bool)
    # Added tokens such as BOS have the empty span (0, 0); answers never start at 0, so they stay out.
    # A token reaching over a span's edge holds prompt text (the header's newline), so it stays out too.
    for span_start, span_end in rendered.answer_spans:
        inside |= (starts >= span_start) & (ends <= span_end)
    labels = np.where(inside, np.asarray(input_ids), IGNORE_INDEX).tolist()
    return EncodedConversation(input_ids, labels)
