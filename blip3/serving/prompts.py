"""From the messages of an OpenAI chat request to the model's inputs for one prompt.

OpenAI content parts become a blip3 conversation: text parts stay text, each `image_url` part becomes
one `<image>` at its place (followed by a newline when text follows, as the xGen-MM SFT data places
its images), and consecutive messages of one role are joined, since the chat template needs user and
assistant turns to alternate. Text may not contain the tokenizer's special tokens: `<image>` typed as
text would shift every image against its tokens, and `<|end|>` or `<|assistant|>` would forge turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip3.processing.processor import Blip3Processor

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class PromptError(ValueError):
    """A request whose messages cannot become a prompt; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it sits in the request, e.g. "messages[0].content[1].image_url"


@dataclass(frozen=True)
class ParsedMessages:
    conversation: list[dict]  # blip3 chat messages: {"role", "content": [{"type": "text" | "image"}, ...]}
    images: list[ImageRef]  # in <image> order


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings the tokenizer turns into special tokens wherever they appear in text."""
    return tuple(sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True))


def parse_messages(messages: Sequence[dict], forbidden: Sequence[str]) -> ParsedMessages:
    """OpenAI messages (plain dicts) -> a blip3 conversation and the image URLs in order."""
    conversation: list[dict] = []
    images: list[ImageRef] = []
    for index, message in enumerate(messages):
        role = ROLES.get(message.get("role", ""))
        if role is None:
            raise PromptError(
                f"role {message.get('role')!r} is not supported (system, user or assistant)", f"messages[{index}].role"
            )
        parts = _parts(message.get("content"), index, role, forbidden, images)
        if conversation and conversation[-1]["role"] == role:  # joined: the template alternates the roles
            conversation[-1]["content"] += [{"type": "text", "text": "\n"}, *parts]
        else:
            conversation.append({"role": role, "content": parts})
    if not conversation or conversation[-1]["role"] != "user":
        raise PromptError("the last message must be a user message", "messages")
    return ParsedMessages(conversation, images)


def _parts(content, index: int, role: str, forbidden: Sequence[str], images: list[ImageRef]) -> list[dict]:
    where = f"messages[{index}].content"
    if content is None:
        content = ""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    parts: list[dict] = []
    for number, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            text = part.get("text") or ""
            for token in forbidden:
                if token in text:
                    raise PromptError(
                        f"text may not contain the special token {token!r}"
                        + ("; send images as image_url parts" if token == "<image>" else ""),
                        f"{where}[{number}].text",
                    )
            if parts and parts[-1]["type"] == "image" and text and not text[0].isspace():
                text = "\n" + text
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            if role != "user":
                raise PromptError(f"images are accepted in user messages only, not in a {role} message", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise PromptError("an image_url part needs image_url.url", f"{where}[{number}].image_url")
            images.append(ImageRef(url, f"{where}[{number}].image_url"))
            parts.append({"type": "image"})
        else:
            raise PromptError(f"content part type {kind!r} is not supported (text or image_url)", f"{where}[{number}]")
    return parts


@dataclass
class PreparedPrompt:
    """One prompt, ready to be batched with others: token ids and the tiles of its images."""

    input_ids: torch.Tensor  # [T], one <image> id per image
    pixel_values: torch.Tensor | None  # [ΣNp, 3, S, S]
    image_sizes: torch.Tensor | None  # [N, 2] (W, H)
    num_tiles: torch.Tensor | None  # [N]
    vision_tokens: int  # LM positions taken by the images once each <image> is expanded
    prompt_tokens: int  # LM positions of the whole prompt: text tokens and vision tokens

    @property
    def num_images(self) -> int:
        return 0 if self.image_sizes is None else len(self.image_sizes)


def prepare_prompt(processor: Blip3Processor, conversation: list[dict], images: list[Image.Image]) -> PreparedPrompt:
    """Tokenise a conversation that ends with a user turn, and tile its images (the default system prompt applies)."""
    try:
        batch = processor.process_conversations(conversation, images or None, add_generation_prompt=True)
    except ValueError as err:  # the template's rules (turn order, image counts): the client's to fix
        raise PromptError(str(err), "messages") from None
    input_ids = batch["input_ids"][0]
    vision = sum(processor.vision_tokens_per_image(tuple(image.size)) for image in images)
    return PreparedPrompt(
        input_ids=input_ids,
        pixel_values=batch.get("pixel_values"),
        image_sizes=batch.get("image_sizes"),
        num_tiles=batch.get("num_tiles"),
        vision_tokens=vision,
        prompt_tokens=len(input_ids) - len(images) + vision,
    )
