"""The chat page in headless Chromium: attach an image, send, watch the answer stream in, ask again.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`, messages separated
by NUL bytes), so no browser-automation package is needed. Skipped where Chromium is not installed
(Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import shutil
import signal
import threading
import time

import openai
import pytest
import torch
from PIL import Image

from blip3.factory import create
from blip3.serving import BackgroundServer, ServeSettings, create_app
from conftest import build_test_tokenizer

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


class Chromium:
    """A headless Chromium and one page in it, spoken to over the DevTools protocol on fds 3 (in) and 4 (out)."""

    def __init__(self, profile_dir: str):
        to_browser, from_browser = os.pipe(), os.pipe()
        # copied above the low fds first, so that the dup2 to 3 and 4 in the child cannot overwrite each other
        to_read, to_write, from_read, from_write = (
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (*to_browser, *from_browser)
        )
        for fd in (*to_browser, *from_browser):
            os.close(fd)
        self.pid = os.posix_spawn(
            CHROMIUM,
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, to_read, 3),
                (os.POSIX_SPAWN_DUP2, from_write, 4),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
        )
        os.close(to_read)
        os.close(from_write)
        self.writer = os.fdopen(to_write, "wb", buffering=0)
        self.reader = os.fdopen(from_read, "rb", buffering=0)
        self.replies: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "DOM"):
            self.call(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        while chunk := self.reader.read(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    self.replies[message["id"]].put(message)
                else:
                    self.events.append(message)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.replies[self.next_id] = queue.Queue()
        self.writer.write(json.dumps(message).encode() + b"\0")
        reply = self.replies[self.next_id].get(timeout=timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def problems(self) -> list[str]:
        """Uncaught exceptions, and errors the console logged (a CSP violation among them)."""
        found = []
        for event in self.events:
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(str(event["params"]["exceptionDetails"]))
            if event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                found.append(event["params"]["entry"]["text"])
        return found

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.writer.close()


@pytest.mark.slow  # Chromium starts in 1–2 s on a quiet machine, 5–13 s measured on a busy one
def test_the_page_sends_an_image_and_streams_the_answer_with_history(tmp_path):
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image_path)
    image_url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()

    with BackgroundServer(create_app(model, processor, ServeSettings())) as server:
        browser = Chromium(str(tmp_path / "profile"))
        try:
            browser.call("Page.navigate", session=True, url=server.url + "/")
            assert browser.wait_for("document.getElementById('model-name')?.textContent") == "blip3"
            browser.evaluate("document.getElementById('max-tokens').value = '12'")

            root = browser.call("DOM.getDocument", session=True)["root"]["nodeId"]
            file_input = browser.call("DOM.querySelector", session=True, nodeId=root, selector="#image-input")["nodeId"]
            browser.call("DOM.setFileInputFiles", session=True, nodeId=file_input, files=[str(image_path)])
            browser.wait_for("document.querySelectorAll('#attachments img').length === 1")

            def ask(text: str, turn: int) -> dict:
                browser.evaluate(
                    f"document.getElementById('prompt').value = {json.dumps(text)};"
                    "document.getElementById('composer').requestSubmit()"
                )
                done = f"document.querySelectorAll('.message.assistant')[{turn}]?.dataset.state"
                assert browser.wait_for(f"['done', 'error'].includes({done}) && {done}") == "done", browser.evaluate(
                    f"document.querySelectorAll('.message.assistant')[{turn}].textContent"
                )
                return browser.evaluate(
                    f"(() => {{ const m = document.querySelectorAll('.message.assistant')[{turn}];"
                    "return {text: m.querySelector('.text').textContent, chunks: Number(m.dataset.chunks),"
                    "finish: m.dataset.finishReason}; })()"
                )

            first = ask("What colour is it?", 0)
            second = ask("And now?", 1)
            screenshot = browser.call("Page.captureScreenshot", session=True)["data"]
            problems = browser.problems()
        finally:
            browser.close()

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        question = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "What colour is it?"},
            ],
        }
        expected_first = client.chat.completions.create(
            model="blip3", messages=[question], max_tokens=12, temperature=0
        )
        history = [
            question,
            {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        ]
        expected_second = client.chat.completions.create(model="blip3", messages=history, max_tokens=12, temperature=0)

    assert problems == []
    assert first["text"] == expected_first.choices[0].message.content and first["finish"] == "length"
    assert first["chunks"] > 1  # the answer arrived in pieces
    assert second["text"] == expected_second.choices[0].message.content  # sent with the history
    image = Image.open(io.BytesIO(base64.b64decode(screenshot)))
    assert image.size[0] > 0
    image.save(tmp_path / "page.png")
