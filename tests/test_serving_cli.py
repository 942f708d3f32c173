"""`blip3 chat` in a terminal session fed line by line, and `blip3 serve`'s options (and, slow, the real command)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from PIL import Image

from blip3.cli import build_parser, main
from blip3.factory import create, load_pretrained
from blip3.serving.cli import settings_from_args
from conftest import REPO, build_test_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "tiny-chat"
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    Image.new("RGB", (64, 48), "red").save(folder.parent / "red.png")
    return folder


def answer(model, processor, conversation, images, max_tokens=5) -> str:
    inputs = processor.process_conversations(conversation, images or None, add_generation_prompt=True)
    return processor.decode_generated(model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False))[0]


def test_chat_streams_answers_keeps_the_history_and_resets(checkpoint, monkeypatch, capsys):
    red = checkpoint.parent / "red.png"
    lines = iter(
        [f"/image {red}", "What colour?", "And now?", "/image nowhere.png", "/reset", "Hello", "/bogus", "/quit"]
    )
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", str(checkpoint), "--max-tokens", "5"])
    out = capsys.readouterr().out

    model, processor = load_pretrained(checkpoint)
    image = Image.open(red).convert("RGB")
    first = answer(model, processor, [{"role": "user", "content": "<image>\nWhat colour?"}], [image])
    history = [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And now?"},
    ]
    second = answer(model, processor, history, [image])
    after_reset = answer(model, processor, [{"role": "user", "content": "Hello"}], [])
    answers = [line.removeprefix("assistant> ") for line in out.splitlines() if line.startswith("assistant> ")]
    assert answers == [first, second, after_reset]
    assert second != answer(model, processor, [{"role": "user", "content": "And now?"}], [])  # the history counted
    assert "(attached" in out and "64×48" in out
    assert "(not attached: cannot read image file 'nowhere.png'" in out
    assert "(conversation cleared)" in out and "unknown command '/bogus'" in out
    assert out.count("(cut at 5 tokens)") == 3


def test_serve_options_become_settings():
    args = build_parser().parse_args(
        [
            "serve",
            "runs/my-model/",
            "--max-batch-size",
            "4",
            "--batch-window-ms",
            "25",
            "--max-images",
            "2",
            "--allow-remote-images",
            "--allowed-domain",
            "images.example.com",
            "--allowed-domain",
            "*.cdn.example.org",
            "--max-image-pixels",
            "1000000",
        ]
    )
    settings = settings_from_args(args)
    assert settings.model_name == "my-model"
    assert settings.max_batch_size == 4 and settings.batch_window_s == pytest.approx(0.025)
    assert settings.max_images_per_request == 2
    assert settings.media.allow_remote and settings.media.allowed_domains == ("images.example.com", "*.cdn.example.org")
    assert settings.media.max_image_pixels == 1_000_000
    default = settings_from_args(build_parser().parse_args(["serve", "ckpt"]))
    assert not default.media.allow_remote and default.media.allowed_domains == ()
    with pytest.raises(SystemExit, match="needs at least one --allowed-domain"):
        main(["serve", "ckpt", "--allow-remote-images"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_serve_command_serves(checkpoint):
    port = free_port()
    env = {**os.environ, "BLIP3_API_KEY": "k"}
    command = [
        sys.executable,
        "-m",
        "blip3.cli",
        "serve",
        str(checkpoint),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        reply = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=3
        )
        assert reply.usage.completion_tokens == 3
        assert httpx.get(f"http://127.0.0.1:{port}/").text.startswith("<!doctype html>")
    finally:
        server.terminate()
        server.wait(timeout=30)
