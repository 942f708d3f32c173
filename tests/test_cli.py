"""The `blip3` command: info, convert, generate, demo."""

from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import load_file

from blip3 import Blip3ForConditionalGeneration
from blip3.cli import main
from blip3.factory import create, load_pretrained
from conftest import TINY_FIXTURE as FIXTURE
from conftest import build_test_tokenizer, needs_tiny_fixture


def test_info_counts_the_released_model_without_weights(capsys):
    main(["info", "--preset", "xgen-mm-phi3-mini-v1.5", "--image-size", "640x480", "--image-size", "1200x300"])
    out = capsys.readouterr().out
    assert "4,359,257,219" in out and "428,225,600" in out and "109,901,568" in out and "3,821,130,051" in out
    assert "640" in out and "512" in out  # vision tokens of 640×480 (5 tiles) and 1200×300 (4 tiles)


@needs_tiny_fixture
def test_convert_official_to_ours_and_back_is_exact(tmp_path, capsys):
    main(["convert", str(FIXTURE), str(tmp_path / "ours")])
    assert (tmp_path / "ours" / "config.json").read_text().count('"model_type": "blip3"') == 1
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "official")])
    original, back = load_file(FIXTURE / "model.safetensors"), load_file(tmp_path / "official" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_generate_and_convert_with_a_processor(tmp_path, capsys):
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (640, 480), "red").save(tmp_path / "red.png")
    args = ["generate", str(tmp_path / "model"), "--image", str(tmp_path / "red.png"), "--prompt", "What colour?"]
    main([*args, "--max-new-tokens", "5", "--no-stream"])
    text = capsys.readouterr().out.strip()
    expected = processor.decode_generated(
        model.eval().generate(
            **processor.process_conversations(
                [{"role": "user", "content": "<image>\nWhat colour?"}],
                [Image.open(tmp_path / "red.png")],
                add_generation_prompt=True,
            ),
            max_new_tokens=5,
            do_sample=False,
        )
    )[0]
    assert text == expected.strip()

    main(["convert", str(tmp_path / "model"), str(tmp_path / "official")])
    reloaded, reprocessor = load_pretrained(tmp_path / "official")
    assert isinstance(reloaded, Blip3ForConditionalGeneration)
    assert reprocessor.image_token_id == processor.image_token_id


def test_quick_demo_runs(tmp_path, capsys):
    main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "every tensor identical after the round trip: True" in out
    assert "batched generation equals one-by-one: True" in out
