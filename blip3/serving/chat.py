"""`blip3 chat`: a conversation with a model in the terminal, answers streamed as they are generated.

    you> /image cat.jpg
    (attached cat.jpg, 640×480)
    you> What is the cat doing?
    assistant> ...

The whole conversation, images included, is the prompt of every turn, as on the server; it runs
through the same prompt building and generation code (`prompts.py`, `engine.py`) in this process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import torch
from PIL import Image

from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.processing.image import ImageError, load_image
from blip3.processing.processor import Blip3Processor
from blip3.serving.engine import Delta, Done, Event, Failed, GenerationRequest, SamplingParams, generate_batch
from blip3.serving.prompts import PromptError, parse_messages, prepare_prompt, special_token_texts

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation
  /quit         leave (also Ctrl-D)
anything else is your message."""


class TerminalChat:
    def __init__(
        self,
        model: Blip3ForConditionalGeneration,
        processor: Blip3Processor,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
        max_image_pixels: int = 4096 * 4096,
        out: TextIO = sys.stdout,
    ):
        self.model, self.processor = model.eval(), processor
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        self.system, self.max_image_pixels, self.out = system, max_image_pixels, out
        self.forbidden = special_token_texts(processor.tokenizer)
        self.context_length = model.config.text_config.max_position_embeddings
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[Image.Image] = []  # of the whole conversation, in order
        self.attached: list[Image.Image] = []  # waiting for the next message

    def run(self, read_line: Callable[[str], str] | None = None) -> None:
        read_line = read_line or input  # looked up now, so a replaced `input` (tests) is the one used
        self.say("blip3 chat: /image PATH attaches an image, /reset starts over, /quit leaves, /help")
        while True:
            try:
                line = read_line("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.say("")
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                self.reset()
                self.say("(conversation cleared)")
            elif line == "/help":
                self.say(HELP)
            elif line == "/image" or line.startswith("/image "):
                self.attach(line[len("/image") :].strip())
            elif line.startswith("/"):
                self.say(f"unknown command {line.split()[0]!r}; /help lists them")
            else:
                self.turn(line)

    def attach(self, path: str) -> None:
        if not path:
            self.say("usage: /image PATH")
            return
        try:
            image = load_image(path, self.max_image_pixels)
        except ImageError as err:
            self.say(f"(not attached: {err})")
            return
        self.attached.append(image)
        self.say(f"(attached {path}, {image.size[0]}×{image.size[1]})")

    def turn(self, text: str) -> None:
        """One exchange: the user's message (with the attached images), the streamed answer."""
        content = [{"type": "image_url", "image_url": {"url": "attached"}} for _ in self.attached]
        messages = [*self.messages, {"role": "user", "content": [*content, {"type": "text", "text": text}]}]
        images = [*self.images, *self.attached]
        try:
            parsed = parse_messages(messages, self.forbidden)
            prompt = prepare_prompt(self.processor, parsed.conversation, images)
        except PromptError as err:
            self.say(f"(not sent: {err})")
            return
        room = self.context_length - prompt.prompt_tokens
        if room < 1:
            self.say(
                f"(not sent: the conversation takes {prompt.prompt_tokens} of {self.context_length} positions; /reset)"
            )
            return
        params = SamplingParams(**{**self.sampling, "max_tokens": min(self.sampling["max_tokens"], room)})
        pieces: list[str] = []
        ending: list[Event] = []

        def sink(event: Event) -> None:
            if isinstance(event, Delta):
                pieces.append(event.text)
                self.out.write(event.text)
                self.out.flush()
            else:
                ending.append(event)

        request = GenerationRequest(prompt, params, sink)
        self.out.write("assistant> ")
        self.out.flush()
        try:
            with torch.inference_mode():
                generate_batch(self.model, self.processor, [request])
        except KeyboardInterrupt:
            request.cancel()
            self.say("\n(interrupted; this exchange is not kept)")
            return
        self.say("")
        if ending and isinstance(ending[0], Failed):
            self.say(f"({ending[0].message})")
            return
        if ending and isinstance(ending[0], Done) and ending[0].finish_reason == "length":
            self.say(f"(cut at {params.max_tokens} tokens)")
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        self.images, self.attached = images, []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
