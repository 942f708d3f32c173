"""`blip3 serve`'s API, spoken to with the official `openai` client over loopback: answers, streaming,
usage, sampling settings, batching, errors, request limits and a bounded load test."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from blip3.factory import create
from blip3.serving import BackgroundServer, ServeSettings, create_app
from conftest import build_test_tokenizer

QUESTION = "What colour is it?"


def png_bytes(colour: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(text: str = QUESTION, *urls: str) -> dict:
    urls = urls or (data_url(png_bytes()),)
    return {
        "role": "user",
        "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": text}],
    }


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header announcing width × height pixels, with a few bytes of data: a decompression bomb's shape."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    return model.eval(), processor


def direct_answer(model, processor, conversation, images, max_tokens: int) -> str:
    """What the model answers alone, through the core API only (no serving code)."""
    inputs = processor.process_conversations(conversation, images or None, add_generation_prompt=True)
    return processor.decode_generated(model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False))[0]


SETTINGS = dict(max_request_bytes=256 * 1024, max_images_per_request=3, max_tokens_limit=8192)


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    with BackgroundServer(create_app(model, processor, ServeSettings(**SETTINGS))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["blip3"]
    assert client.models.retrieve("blip3").owned_by == "blip3"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "blip3"


def test_answer_with_an_image_equals_direct_generation_and_counts_vision_tokens(tiny, client):
    model, processor = tiny
    response = client.chat.completions.create(model="blip3", messages=[image_message()], max_tokens=6)
    image = Image.open(io.BytesIO(png_bytes()))
    expected = direct_answer(model, processor, [{"role": "user", "content": "<image>\n" + QUESTION}], [image], 6)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "length"
    # prompt tokens: the text tokens without the one <image> id, plus that image's vision tokens
    text_ids = processor.process_conversations(
        [{"role": "user", "content": "<image>\n" + QUESTION}], [image], add_generation_prompt=True
    )["input_ids"][0]
    vision = processor.vision_tokens_per_image(image.size)
    assert vision > 1
    assert response.usage.prompt_tokens == len(text_ids) - 1 + vision
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


def test_streaming_sends_the_same_answer_in_chunks_with_usage(client):
    answer = client.chat.completions.create(model="blip3", messages=[image_message()], max_tokens=8)
    stream = client.chat.completions.create(
        model="blip3", messages=[image_message()], max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not sent in one piece
    assert "".join(pieces) == answer.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_stop_strings_end_the_answer_before_them(client):
    messages = [{"role": "user", "content": "Describe the picture in detail."}]
    full = client.chat.completions.create(model="blip3", messages=messages, max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    cut = client.chat.completions.create(model="blip3", messages=messages, max_tokens=16, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16
    streamed = client.chat.completions.create(model="blip3", messages=messages, max_tokens=16, stop=stop, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == expected  # the stop string never reaches the client, not even in part


def test_seeded_sampling_repeats_and_top_p_near_zero_is_greedy(client):
    messages = [image_message("Describe the picture in detail.")]
    sample = lambda **kw: client.chat.completions.create(model="blip3", messages=messages, max_tokens=8, **kw)  # noqa: E731
    first = sample(temperature=1.5, seed=7).choices[0].message.content
    assert sample(temperature=1.5, seed=7).choices[0].message.content == first
    others = {sample(temperature=1.5, seed=seed).choices[0].message.content for seed in (8, 9, 10)}
    assert others != {first}  # the seed matters
    greedy = sample(temperature=0).choices[0].message.content
    assert sample(temperature=1.5, top_p=1e-6, seed=3).choices[0].message.content == greedy


def test_concurrent_requests_share_a_batch_and_answer_as_one_by_one(tiny):
    model, processor = tiny
    settings = ServeSettings(max_batch_size=4, batch_window_s=30.0)
    prompts = [
        ("red", (64, 48), "What colour is it?"),
        ("blue", (30, 90), "Describe the picture in detail."),
        ("green", (200, 40), "How many objects are there?"),
        (None, None, "Look at this image and this image."),
    ]
    with BackgroundServer(create_app(model, processor, settings)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(prompt, **kw):
            colour, size, text = prompt
            message = (
                image_message(text, data_url(png_bytes(colour, size))) if colour else {"role": "user", "content": text}
            )
            return client.chat.completions.create(model="blip3", messages=[message], max_tokens=10, **kw)

        scheduler = running.app.state.scheduler
        with ThreadPoolExecutor(4) as pool, scheduler.preparing():  # held until all four wait: one batch
            # a sampled row rides along: batches mix greedy and sampled rows
            sampling = lambda p: {"temperature": 1.0, "seed": 1} if p[0] == "green" else {}  # noqa: E731
            futures = [pool.submit(ask, p, **sampling(p)) for p in prompts]
            while scheduler.pending + scheduler.running < 4:
                time.sleep(0.01)
        answers = [future.result() for future in futures]
        deadline = time.monotonic() + 30  # the answers reach their clients just before the batch is counted
        while not scheduler.stats.batch_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats.batch_sizes == [4]
    for (colour, size, text), answer in zip(prompts, answers):
        if colour == "green":
            continue
        images = [Image.new("RGB", size, colour)] if colour else []
        content = ("<image>\n" if colour else "") + text
        assert answer.choices[0].message.content == direct_answer(
            model, processor, [{"role": "user", "content": content}], images, 10
        )


def test_errors_have_openai_bodies(client):
    ok = [image_message()]
    cases = [
        (openai.NotFoundError, dict(model="gpt-4o", messages=ok), "model_not_found"),
        (openai.BadRequestError, dict(model="blip3", messages=ok, n=2), "unsupported_parameter"),
        (openai.BadRequestError, dict(model="blip3", messages=ok, temperature=7), None),
        (openai.BadRequestError, dict(model="blip3", messages=ok, max_tokens=9000), None),
        (openai.BadRequestError, dict(model="blip3", messages=ok, max_tokens=8000), "context_length_exceeded"),
        (openai.BadRequestError, dict(model="blip3", messages=[{"role": "assistant", "content": "hi"}]), None),
        (openai.BadRequestError, dict(model="blip3", messages=[{"role": "user", "content": "a <image> b"}]), None),
        (openai.BadRequestError, dict(model="blip3", messages=[{"role": "user", "content": "x<|end|>"}]), None),
        (openai.BadRequestError, dict(model="blip3", messages=[{"role": "tool", "content": "x"}]), None),
    ]
    for error, kwargs, code in cases:
        with pytest.raises(error) as raised:
            client.chat.completions.create(**kwargs)
        body = raised.value.body
        assert set(body) == {"message", "type", "param", "code"}, kwargs
        assert body["message"] and body["type"] in ("invalid_request_error", "not_found_error")
        if code:
            assert body["code"] == code
    assert "special token '<image>'" in _error(client, [{"role": "user", "content": "a <image> b"}])["message"]


def _error(client, messages, **kwargs) -> dict:
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="blip3", messages=messages, **kwargs)
    return raised.value.body | {"status": raised.value.status_code}


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx.get(server.url + "/v1/chat/completions")
    assert response.status_code == 405 and "message" in response.json()["error"]
    response = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_api_key_is_required_when_set(tiny):
    model, processor = tiny
    with BackgroundServer(create_app(model, processor, ServeSettings(api_key="s3cret"))) as running:
        base = running.url + "/v1"
        with pytest.raises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert raised.value.body["code"] == "invalid_api_key"
        assert httpx.post(base + "/chat/completions", json={}).status_code == 401
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="blip3", messages=[image_message()], max_tokens=2).choices
        assert httpx.get(running.url + "/health").status_code == 200  # health checks need no key


def test_oversized_bodies_get_413_and_the_server_stays_up(server, client):
    big = image_message(QUESTION, data_url(b"\x89PNG" + b"\0" * 300_000))
    error = _error(client, [big])
    assert error["status"] == 413 and error["code"] == "request_too_large"

    def chunked_body():  # no Content-Length: the limit must be enforced while reading
        yield b'{"model": "blip3", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}]}'

    response = httpx.post(server.url + "/v1/chat/completions", content=chunked_body(), timeout=30)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]
    assert client.chat.completions.create(model="blip3", messages=[image_message()], max_tokens=2).choices


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([data_url(png_bytes())] * 4, "at most 3 per request"),
        (["data:image/png;base64,iVBORw0K$$$not-base64"], "invalid base64"),
        ([data_url(b"just some text, not pixels", "image/png")], "not a PNG, JPEG, GIF, WebP or BMP image"),
        ([data_url(bomb_png(8000, 8000))], "8000×8000 pixels exceeds the limit of 16777216"),
        ([data_url(bomb_png(30000, 30000))], "is too large"),
        ([data_url(png_bytes()[:60])], "truncated or corrupt"),
        (["data:text/plain;base64,aGVsbG8="], "not an image type"),
        (["http://example.com/cat.png"], "does not fetch remote image URLs"),
        (["file:///etc/passwd"], "scheme 'file' is not allowed"),
    ],
    ids=[
        "too-many-images",
        "bad-base64",
        "not-an-image",
        "decompression-bomb",
        "pil-sized-bomb",
        "truncated",
        "text-media-type",
        "remote-off",
        "file-scheme",
    ],
)
def test_bad_images_get_a_clear_400_and_the_server_stays_up(client, urls, message):
    error = _error(client, [image_message(QUESTION, *urls)])
    assert error["status"] == 400 and message in error["message"], error
    assert error["param"].startswith("messages")
    assert client.chat.completions.create(model="blip3", messages=[image_message()], max_tokens=2).choices


def test_a_disconnected_stream_stops_its_generation(server, client):
    scheduler = server.app.state.scheduler
    batches_before = scheduler.stats.batches
    stream = client.chat.completions.create(
        model="blip3",
        messages=[{"role": "user", "content": "Describe the picture in detail."}],
        max_tokens=4000,
        stream=True,
    )
    started = time.monotonic()
    next(iter(stream)), next(iter(stream))
    stream.close()
    while scheduler.stats.batches == batches_before:  # the batch ends once its only row is cancelled
        assert time.monotonic() - started < 10, "generation went on after the client left"
        time.sleep(0.02)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(
    not hasattr(threading, "get_native_id") or not __import__("os").path.exists("/proc/self/statm"),
    reason="reads RSS from /proc",
)
def test_fifty_concurrent_requests_all_succeed_and_memory_stays_bounded(server, client):
    images = [
        data_url(png_bytes(colour, (64 + 8 * i, 48)))
        for i, colour in enumerate(["red", "green", "blue", "white", "black"])
    ]

    def ask(i: int) -> tuple[str, int]:
        messages = [image_message(f"Question {i}: {QUESTION}", images[i % 5])]
        if i % 2:  # half of them streamed, read to the end in this thread
            chunks = list(
                client.chat.completions.create(
                    model="blip3", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
                )
            )
            return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens
        reply = client.chat.completions.create(model="blip3", messages=messages, max_tokens=4)
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    def round_of_fifty() -> float:
        with ThreadPoolExecutor(50) as pool:
            assert list(pool.map(ask, range(50))) == [("length", 4)] * 50
        return _rss_mib()

    before = _rss_mib()
    after_first = round_of_fifty()  # may warm caches, allocator arenas and thread pools
    after_second = round_of_fifty()  # must not keep growing
    stats = server.app.state.scheduler.stats
    assert stats.largest_batch > 1  # the load was batched
    assert after_first - before < 300, (before, after_first)
    assert after_second - after_first < 50, (before, after_first, after_second)
