"""Batched generation for many concurrent requests: one `generate` call serves a whole batch.

    request ─► BatchScheduler.submit ─► pending queue ─► worker thread: collect a batch ─► generate_batch
                                                          (up to max_batch_size; waits for        │
                                                           requests still being prepared)         ▼
    request ◄── Delta, Delta, ..., Done  ◄────────── per token, per row: text, stops, max_tokens

A batch starts when it is full, when no other request is on its way (the server counts the requests
it is still reading and preparing: `BatchScheduler.preparing`), or when its oldest request has
waited `batch_window_s`, whichever comes first. So a lone request never waits, and a burst of
requests, whose images take a few milliseconds each to decode, still shares one batch.

`generate_batch` left-pads the prompts into one batch and runs the model's `generate` once. Two
small hooks into transformers' decoding loop make one call serve requests with different settings:

- `RowSampler` (a logits processor) samples each row with its own temperature, top-p and
  `torch.Generator`, then leaves only the chosen token finite, so the loop's greedy argmax takes it.
  Greedy rows are untouched. Every mix of settings therefore shares a batch, and a seeded request
  draws from its own generator: its answer does not depend on what it was batched with.
- `RowProgress` (a stopping criterion, called after every step) turns each row's new token into
  text, cuts it at the request's stop strings, counts it against its `max_tokens`, hands the text
  to the request, and tells the loop which rows are done. A row whose client went away is done too.

The batch runs until its last row is done; rows that finish early are answered at once. Requests
that arrive meanwhile wait for the next batch (this is static batching: transformers' `generate`
cannot take new rows mid-flight).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.processing.processor import Blip3Processor
from blip3.serving.prompts import PreparedPrompt

log = logging.getLogger("blip3.serving")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


# What a request hears from the worker thread, in this order: Delta* (streamed requests) then Done, or Failed.
@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens)
    completion_tokens: int
    text: str  # the whole answer (a streamed request has also had it in Deltas)


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to answer. `sink` is called from the worker thread and must not block."""

    prompt: PreparedPrompt
    params: SamplingParams
    sink: Callable[[Event], None]
    stream: bool = True  # Deltas as the text grows; otherwise the answer comes in Done alone
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop generating for this request (its client went away); its row ends at the next step."""
        self.cancelled.set()


# ---------------------------------------------------------------------------------------------------
# Text of one row


class StreamingText:
    """A row's new tokens -> text deltas that never show a stop string, nor half of a UTF-8 character.

    Tokens are decoded in a sliding window (the last emitted tokens give the context that decides
    leading spaces), so each step costs the same however long the answer grows. Text that could be
    the beginning of a stop string is held back until the next tokens settle it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] were decoded already: context only
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of `text` the request has been given

    def add(self, token: int) -> tuple[str, bool]:
        """Take one token; return (text the request may see now, whether a stop string was reached)."""
        self.tokens.append(token)
        context = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset :])
        if len(window) > len(context) and not window.endswith("\ufffd"):  # "\ufffd": an unfinished UTF-8 sequence
            self.text += window[len(context) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._release(final=False)

    @property
    def answer(self) -> str:
        """The text released so far: the answer, once the row has ended."""
        return self.text[: self.emitted]

    def append(self, token: int) -> None:
        """Take a token without decoding it now (`finish` decodes whatever was appended)."""
        self.tokens.append(token)

    def finish(self) -> str:
        """Whatever is still held back, when the row ends for another reason than a stop string."""
        context = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset :])
        self.text += window[len(context) :]
        self.prefix_offset = self.read_offset = len(self.tokens)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            delta, self.emitted = self.text[self.emitted : cut], cut
            return delta, True
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta, False

    def _held_back(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        tail = self.text[self.emitted :]
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


class _Row:
    """A request's place in a running batch."""

    def __init__(self, request: GenerationRequest, tokenizer, end_token_ids: set[int]):
        self.request = request
        self.text = StreamingText(tokenizer, request.params.stop)
        # Text is needed token by token only to stream it or to look for stop strings; otherwise the
        # answer is decoded once at the end, which keeps a large batch's steps free of per-row work.
        self.incremental = request.stream or bool(self.text.stop)
        self.end_token_ids = end_token_ids
        self.num_tokens = 0
        self.finished = False

    def step(self, token: int) -> None:
        if self.request.cancelled.is_set():
            self.finished = True  # nobody is listening: stop quietly
            return
        self.num_tokens += 1
        if token in self.end_token_ids:
            self.finish("stop")
            return
        if not self.incremental:
            self.text.append(token)
            stopped = False
        else:
            delta, stopped = self.text.add(token)
            if delta and self.request.stream:
                self.emit(Delta(delta))
        if stopped:
            self._done("stop")
        elif self.num_tokens >= self.request.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the row, sending what was held back: the end of turn or max_tokens came before any stop string."""
        if self.finished:
            return
        delta = self.text.finish()
        if delta and self.request.stream:
            self.emit(Delta(delta))
        self._done(reason)

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.emit(Failed(message))

    def _done(self, reason: str) -> None:
        self.finished = True
        self.emit(Done(reason, self.num_tokens, self.text.answer))

    def emit(self, event: Event) -> None:
        try:
            self.request.sink(event)
        except Exception:  # the request's side is gone (e.g. its event loop closed): nothing to tell
            log.debug("dropping an event for a vanished request", exc_info=True)
            self.request.cancel()


class RowProgress(StoppingCriteria):
    """After each step: every live row takes its new token; returns which rows are done."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # without a prompt in input_ids (generate starts from embeddings), the last column is the new token
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.finished:
                row.step(token)
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)


class RowSampler(LogitsProcessor):
    """Temperature and top-p sampling per row, each row with its own generator (see the module doc)."""

    def __init__(self, params: Sequence[SamplingParams]):
        self.params = list(params)
        self.generators: list[torch.Generator | None] = [None] * len(self.params)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, params in enumerate(self.params):
            if params.temperature <= 0:
                continue
            probs = torch.softmax(scores[row] / params.temperature, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set of most likely tokens whose mass reaches top_p (at least one token)
                sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p] = 0
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
            token = torch.multinomial(probs, 1, generator=self._generator(row, scores.device))
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0
        return scores

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        if self.generators[row] is None:
            seed = self.params[row].seed
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            self.generators[row] = generator
        return self.generators[row]


# ---------------------------------------------------------------------------------------------------
# One batch


def collate(prompts: Sequence[PreparedPrompt], pad_token_id: int) -> dict:
    """Prompts of different lengths and image counts -> one left-padded batch for `model.generate`."""
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt.input_ids) :] = prompt.input_ids
        attention_mask[row, width - len(prompt.input_ids) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    with_images = [p for p in prompts if p.num_images]
    if with_images:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
        batch["image_sizes"] = torch.cat([p.image_sizes for p in with_images])
        batch["num_tiles"] = torch.cat([p.num_tiles for p in with_images])
        batch["num_images"] = torch.tensor([p.num_images for p in prompts], dtype=torch.long)
    return batch


def end_token_ids(model: Blip3ForConditionalGeneration) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def generate_batch(
    model: Blip3ForConditionalGeneration, processor: Blip3Processor, requests: Sequence[GenerationRequest]
) -> None:
    """Answer `requests` with one `generate` call; each hears its Deltas and its Done (or Failed)."""
    rows = [_Row(request, processor.tokenizer, end_token_ids(model)) for request in requests]
    params = [request.params for request in requests]
    device = model.device
    batch = {k: v.to(device) for k, v in collate([r.prompt for r in requests], processor.pad_token_id).items()}
    sampler = RowSampler(params) if any(p.temperature > 0 for p in params) else None
    try:
        model.generate(
            **batch,
            max_new_tokens=max(p.max_tokens for p in params),
            do_sample=False,  # sampled rows are decided by RowSampler; the loop's argmax then takes its choice
            stopping_criteria=StoppingCriteriaList([RowProgress(rows)]),
            logits_processor=LogitsProcessorList([sampler]) if sampler is not None else None,
        )
    except Exception as err:
        log.exception("generation failed for a batch of %d", len(rows))
        for row in rows:
            row.fail(f"generation failed: {type(err).__name__}: {err}")
        return
    for row in rows:  # rows whose max_tokens equalled the batch's end on its last step
        row.finish("length")


# ---------------------------------------------------------------------------------------------------
# The scheduler


class QueueFull(RuntimeError):
    pass


@dataclass
class SchedulerStats:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1000


class BatchScheduler:
    """Collects concurrent requests into batches and runs them, one batch at a time, on a worker thread.

    max_batch_size: rows per `generate` call (1 disables batching).
    batch_window_s: the longest the oldest request of a batch waits for requests still being prepared.
    max_pending: requests allowed to wait; beyond it `submit` raises `QueueFull` (the server says 503).
    """

    def __init__(
        self,
        model: Blip3ForConditionalGeneration,
        processor: Blip3Processor,
        max_batch_size: int = 16,
        batch_window_s: float = 0.05,
        max_pending: int = 256,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.processor = model, processor
        self.max_batch_size, self.batch_window_s, self.max_pending = max_batch_size, batch_window_s, max_pending
        self.stats = SchedulerStats()
        self._pending: deque[GenerationRequest] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: list[GenerationRequest] = []  # the batch being generated
        self._preparing = 0  # requests received but not submitted yet

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="blip3-generate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Fail the waiting and the running requests, end the running batch at its next step, end the worker."""
        with self._wakeup:
            self._stopping = True
            waiting, self._pending = list(self._pending), deque()
            self._wakeup.notify_all()
        for request in [*waiting, *self._running]:
            request.cancel()
            try:
                request.sink(Failed("the server is shutting down"))
            except Exception:  # its event loop may be closing too
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def pending(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests in the batch being generated."""
        return len(self._running)

    @contextmanager
    def preparing(self):
        """Held while a request is read and prepared, so that a starting batch may wait for it."""
        with self._wakeup:
            self._preparing += 1
        try:
            yield
        finally:
            with self._wakeup:
                self._preparing -= 1
                self._wakeup.notify_all()

    def submit(self, request: GenerationRequest) -> None:
        with self._wakeup:
            if self._stopping or self._thread is None:
                raise QueueFull("the server is not accepting requests")
            if len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(request)
            self._wakeup.notify()

    def _next_batch(self) -> list[GenerationRequest] | None:
        with self._wakeup:
            while not self._pending and not self._stopping:
                self._wakeup.wait()
            # the oldest request waits for those still being prepared, at most batch_window_s from its arrival
            deadline = self._pending[0].arrived + self.batch_window_s if self._pending else 0.0
            while not self._stopping and len(self._pending) < self.max_batch_size and self._preparing > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.wait(remaining)
            if self._stopping:
                return None
            size = min(self.max_batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(size)]
        return [request for request in batch if not request.cancelled.is_set()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            self._running = batch
            with torch.inference_mode():
                generate_batch(self.model, self.processor, batch)
            self._running = []
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.batch_sizes = [*self.stats.batch_sizes[-999:], len(batch)]
