"""Shared test helpers: fixture location, a tiny tokenizer, a tiny processor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("BLIP3_FIXTURES", REPO.parent / "shared" / "fixtures"))
# The reference fixture produced by the original xGen-MM code; tests that read it skip where it is absent.
TINY_FIXTURE = FIXTURES / "xgenmm-tiny-a"
needs_tiny_fixture = pytest.mark.skipif(not TINY_FIXTURE.is_dir(), reason=f"reference fixture {TINY_FIXTURE} not found")

# Enough text to learn a few hundred merges; the chat tests draw their words from it.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What is in the image? A red circle on the left and a blue square on the right.",
    "Describe the picture in detail.\nThere are three shapes on a white background.",
    "How many objects are there? There are two objects: a triangle and a star.",
    "Look at this image and this image. What is in the second image?",
    "Ünïcödé wörds, 数字 and emoji 🙂 appear too.",
]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny models run as fast on one thread (a second only fights other jobs for a busy machine's
    cores), and a run compared bit for bit with one in a subprocess started with OMP_NUM_THREADS=1
    must sum in the same order.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_test_tokenizer(phi3_layout: bool = True):
    from blip3.processing.tokenizer import build_tokenizer

    return build_tokenizer(CORPUS * 4, vocab_size=600, phi3_layout=phi3_layout)


@pytest.fixture(scope="session")
def processor():
    """A processor for the `tiny` preset (tiles of 28 px, 4 tokens per tile) with a Phi-3-layout tokenizer."""
    from blip3 import Blip3Processor, preset

    return Blip3Processor.from_config(preset("tiny"), build_test_tokenizer())
