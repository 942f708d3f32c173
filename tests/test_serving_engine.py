"""The generation engine under the server: streamed text with stop strings, per-row sampling, the scheduler."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from blip3.factory import create
from blip3.serving import engine
from blip3.serving.engine import (
    BatchScheduler,
    Delta,
    Done,
    Failed,
    GenerationRequest,
    QueueFull,
    RowSampler,
    SamplingParams,
    StreamingText,
    generate_batch,
)
from blip3.serving.prompts import prepare_prompt
from conftest import build_test_tokenizer

TEXT = "Ünïcödé wörds, 数字 and emoji 🙂 appear too."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    return model.eval(), processor


def stream(tokenizer, text: str, stop=()) -> tuple[list[str], bool]:
    """Feed `text`'s tokens one by one; the deltas released and whether a stop string ended it."""
    streaming, deltas = StreamingText(tokenizer, stop), []
    for token in tokenizer.encode(text, add_special_tokens=False):
        delta, stopped = streaming.add(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(streaming.finish())
    return deltas, False


def test_streamed_text_is_the_decoded_text_and_never_half_a_character(tiny):
    tokenizer = tiny[1].tokenizer
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(tokens) > len(TEXT.split())  # multi-byte characters span several byte-level tokens
    deltas, stopped = stream(tokenizer, TEXT)
    assert "".join(deltas) == TEXT and not stopped
    assert not any("\ufffd" in delta for delta in deltas)
    assert sum(1 for delta in deltas if delta) > 5  # released as it comes, not all at the end


@pytest.mark.parametrize("stop", ["emoji", "数字", "wörds, 数", "o"])
def test_stop_strings_cut_the_text_and_are_never_released(tiny, stop):
    deltas, stopped = stream(tiny[1].tokenizer, TEXT, stop=("never here", stop))
    assert stopped and "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_a_stop_string_that_never_completes_is_released_in_full(tiny):
    tokenizer = tiny[1].tokenizer
    streaming, released = StreamingText(tokenizer, ("appear now",)), ""
    for token in tokenizer.encode(TEXT, add_special_tokens=False):
        released += streaming.add(token)[0]
        if released.endswith("appear"):  # "appear" could still become "appear now": held back meanwhile
            pytest.fail("text that could start a stop string was released early")
    assert released + streaming.finish() == TEXT


def test_rows_sample_with_their_own_generators():
    torch.manual_seed(123)
    scores = torch.randn(4, 50)
    scores[2] = scores[1]
    params = [
        SamplingParams(4),  # greedy: left untouched
        SamplingParams(4, temperature=1.0, seed=5),
        SamplingParams(4, temperature=1.0, seed=5),
        SamplingParams(4, temperature=1.0, seed=6),
    ]
    drawn = RowSampler(params)(None, scores.clone())
    assert torch.equal(drawn[0], scores[0])
    chosen = [int(row.argmax()) for row in drawn[1:]]
    assert all(torch.isinf(drawn[r]).sum() == 49 for r in (1, 2, 3))  # one finite score per sampled row
    assert chosen[0] == chosen[1]  # same seed, same draw, whatever else is in the batch
    alone = RowSampler([SamplingParams(4, temperature=1.0, seed=5)])(None, scores[1:2].clone())
    assert int(alone[0].argmax()) == chosen[0]
    draws = {
        int(RowSampler([SamplingParams(4, temperature=1.0, seed=s)])(None, scores[1:2].clone())[0].argmax())
        for s in range(40)
    }
    assert len(draws) > 3  # it does sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.15, 0.1]]))
    draws = {
        int(RowSampler([SamplingParams(1, temperature=1.0, top_p=0.5, seed=s)])(None, logits.clone())[0].argmax())
        for s in range(60)
    }
    assert draws == {0, 1}


def prompt_for(processor, text: str, image: Image.Image | None = None):
    content = [{"type": "image"}, {"type": "text", "text": "\n" + text}] if image else text
    return prepare_prompt(processor, [{"role": "user", "content": content}], [image] if image else [])


def collect(request_events: list):
    return lambda event: request_events.append(event)


def test_generate_batch_stops_each_row_at_its_own_max_tokens(tiny):
    model, processor = tiny
    red = prompt_for(processor, "What colour?", Image.new("RGB", (50, 40), "red"))
    events = [[], [], [], []]
    requests = [
        GenerationRequest(red, SamplingParams(3), collect(events[0])),
        GenerationRequest(
            prompt_for(processor, "Describe the picture in detail."), SamplingParams(7), collect(events[1])
        ),
        GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(1), collect(events[2])),
        GenerationRequest(red, SamplingParams(3), collect(events[3]), stream=False),
    ]
    generate_batch(model, processor, requests)
    for row_events, limit in zip(events[:3], (3, 7, 1)):
        *deltas, done = row_events
        assert (done.finish_reason, done.completion_tokens) == ("length", limit)
        assert all(isinstance(event, Delta) for event in deltas) and "".join(d.text for d in deltas) == done.text
    assert events[3] == [events[0][-1]]  # not streamed: the same answer, in Done alone


def test_the_end_token_finishes_a_row_with_stop(tiny, monkeypatch):
    model, processor = tiny
    first_tokens, real_step = [], engine._Row.step
    monkeypatch.setattr(engine._Row, "step", lambda row, token: (first_tokens.append(token), real_step(row, token))[1])
    generate_batch(
        model, processor, [GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(1), lambda e: None)]
    )
    monkeypatch.setattr(engine._Row, "step", real_step)
    monkeypatch.setattr(engine, "end_token_ids", lambda model: {first_tokens[0]})  # as if it ended the turn
    events = []
    generate_batch(model, processor, [GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(5), events.append)])
    assert events == [Done("stop", 1, "")]  # no text: the end token is not shown


def test_a_failing_batch_fails_each_of_its_requests(tiny):
    model, processor = tiny
    good = prompt_for(processor, "What colour?", Image.new("RGB", (50, 40), "red"))
    good.num_tiles = good.num_tiles + 1  # inconsistent with its pixels: generate raises
    events = [[], []]
    generate_batch(
        model,
        processor,
        [
            GenerationRequest(good, SamplingParams(3), collect(events[0])),
            GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(3), collect(events[1])),
        ],
    )
    for row_events in events:
        assert (
            len(row_events) == 1 and isinstance(row_events[0], Failed) and "generation failed" in row_events[0].message
        )


def run_scheduler(tiny, requests, **settings) -> list[int]:
    model, processor = tiny
    scheduler = BatchScheduler(model, processor, **settings)
    scheduler.start()
    try:
        with scheduler.preparing():  # as a server does while requests come in: the first batch waits for them
            for request in requests:
                scheduler.submit(request)
        deadline = time.monotonic() + 30
        while scheduler.stats.requests < sum(not r.cancelled.is_set() for r in requests):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        scheduler.stop()
    return scheduler.stats.batch_sizes


def test_the_scheduler_fills_batches_up_to_their_size(tiny):
    processor = tiny[1]
    prompt = prompt_for(processor, "Hi")
    done = threading.Event()
    requests = [
        GenerationRequest(prompt, SamplingParams(2), lambda e: isinstance(e, Done) and done.set()) for _ in range(5)
    ]
    assert run_scheduler(tiny, requests, max_batch_size=3, batch_window_s=0.3) == [3, 2]
    requests = [GenerationRequest(prompt, SamplingParams(2), lambda e: None) for _ in range(3)]
    assert run_scheduler(tiny, requests, max_batch_size=1, batch_window_s=0.3) == [1, 1, 1]


def test_a_lone_request_does_not_wait_for_the_window(tiny):
    model, processor = tiny
    done = threading.Event()
    scheduler = BatchScheduler(model, processor, max_batch_size=4, batch_window_s=30.0)
    scheduler.start()
    try:
        started = time.monotonic()
        scheduler.submit(
            GenerationRequest(
                prompt_for(processor, "Hi"), SamplingParams(2), lambda e: isinstance(e, Done) and done.set()
            )
        )
        assert done.wait(20) and time.monotonic() - started < 20  # nothing else was on its way: no 30 s wait
    finally:
        scheduler.stop()


def test_cancelled_requests_are_dropped_before_they_run(tiny):
    processor = tiny[1]
    events = []
    requests = [GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(2), events.append) for _ in range(3)]
    requests[1].cancel()
    assert run_scheduler(tiny, requests, max_batch_size=4, batch_window_s=0.2) == [2]
    assert sum(isinstance(e, Done) for e in events) == 2


def test_a_full_queue_refuses_and_stopping_fails_the_waiting_and_the_running(tiny):
    model, processor = tiny
    events = {}
    scheduler = BatchScheduler(model, processor, max_batch_size=1, batch_window_s=0.0, max_pending=2)
    scheduler.start()
    requests = [
        GenerationRequest(prompt_for(processor, "Hi"), SamplingParams(3000), events.setdefault(i, []).append)
        for i in range(4)
    ]
    scheduler.submit(requests[0])
    while not scheduler.running:  # the first is being generated...
        time.sleep(0.01)
    scheduler.submit(requests[1])  # ...two may wait...
    scheduler.submit(requests[2])
    with pytest.raises(QueueFull):  # ...and no more
        scheduler.submit(requests[3])
    started = time.monotonic()
    scheduler.stop()  # the running batch of 3000 tokens ends at its next step
    assert time.monotonic() - started < 5
    submitted = [i for i in events if any(isinstance(e, Failed) for e in events[i])]
    assert len(submitted) == 3 and all(Failed("the server is shutting down") in events[i] for i in submitted)
    with pytest.raises(QueueFull):
        scheduler.submit(requests[0])
