"""Faithfulness: reproduce what the original xGen-MM code produced on the fixtures in `../shared/fixtures`.

Each fixture folder holds a tiny checkpoint in the official layout, inputs (`inputs.json`,
`inputs.safetensors`, PNGs) and the original code's outputs (`expected.*`). Cases are discovered from
`inputs.json`; extra fixture folders can be added with BLIP3_EXTRA_FIXTURES (colon-separated).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip3 import Blip3ForConditionalGeneration, Blip3ImageProcessor
from conftest import FIXTURES as FIXTURE_ROOT

ATOL = 1e-4


def fixture_dirs() -> list[Path]:
    root = FIXTURE_ROOT
    dirs = sorted(p for p in root.glob("*") if (p / "inputs.json").is_file()) if root.is_dir() else []
    extra = [Path(p) for p in os.environ.get("BLIP3_EXTRA_FIXTURES", "").split(":") if p]
    return dirs + extra


class Fixture:
    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "inputs.json").read_text())
        self.inputs = load_file(path / "inputs.safetensors")
        self.expected = load_file(path / "expected.safetensors")
        self.expected_meta = json.loads((path / "expected.json").read_text())

    def image_key(self, name: str) -> str:
        return self.meta["images"][name]["pixel_values_key"].removeprefix("pixel_values.")

    def images_of(self, case: dict) -> tuple[list[list[torch.Tensor]], list[list[tuple[int, int]]]]:
        """Nested (sample → image) tile tensors and (W, H) sizes, as the original model takes them."""
        pixels = [[self.inputs[f"pixel_values.{self.image_key(n)}"] for n in s["images"]] for s in case["samples"]]
        sizes = [
            [tuple(self.inputs[f"image_size.{self.image_key(n)}"].tolist()) for n in s["images"]]
            for s in case["samples"]
        ]
        return pixels, sizes


FIXTURES = fixture_dirs()
CASES = [(d, c["name"]) for d in FIXTURES for c in json.loads((d / "inputs.json").read_text())["cases"]]
if not FIXTURES:
    pytest.skip("no fixtures found (set BLIP3_FIXTURES)", allow_module_level=True)


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.name)
def loaded(request):
    fixture = Fixture(request.param)
    model = Blip3ForConditionalGeneration.from_pretrained(request.param).eval()
    return fixture, model


def case_of(fixture: Fixture, name: str) -> dict:
    return next(c for c in fixture.meta["cases"] if c["name"] == name)


def cases_for(fixture: Fixture) -> list[str]:
    return [c["name"] for c in fixture.meta["cases"]]


def assert_close(actual, expected, what, atol=ATOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.2e} > {atol:.0e}"


def test_pixel_values_are_exact(loaded):
    fixture, model = loaded
    processor = Blip3ImageProcessor.from_model_config(model.config)
    for name, info in fixture.meta["images"].items():
        image = Image.open(fixture.path / "images" / name).convert("RGB")
        out = processor([image])
        expected = fixture.inputs[info["pixel_values_key"]]
        assert out["pixel_values"].dtype == expected.dtype
        assert torch.equal(out["pixel_values"], expected), f"{name}: pixels differ"
        assert out["image_sizes"].tolist() == [list(info["image_size_wh"])]
        assert out["num_tiles"].tolist() == [info["num_tiles"]]


def test_vision_features_sampler_inputs_and_tokens(loaded):
    fixture, model = loaded
    captured = {}

    def capture(module, args, kwargs):
        captured["media"], captured["mask"] = args[0], args[1]

    hook = model.model.token_sampler.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for name in cases_for(fixture):
            case = case_of(fixture, name)
            pixels, sizes = fixture.images_of(case)
            ids = fixture.inputs[f"{name}.forward.lang_x"]
            with torch.no_grad():
                images = model.model.collect_images(ids, pixels, sizes)
                if not images.image_sizes:
                    continue
                assert_close(
                    model.model.encode_tiles(images.pixel_values),
                    fixture.expected[f"{name}.vision_features"],
                    f"{name} vision features",
                )
                tokens = torch.cat(model.model.get_image_features(images))
            assert_close(captured["media"], fixture.expected[f"{name}.perceiver_input"], f"{name} sampler input")
            mask = captured["mask"]
            mask = torch.ones(captured["media"].shape[:2]) if mask is None else mask.float()
            assert torch.equal(mask, fixture.expected[f"{name}.perceiver_mask"]), f"{name}: sampler masks differ"
            expected_tokens = fixture.expected[f"{name}.vision_tokens"]
            assert_close(tokens, expected_tokens.flatten(0, 1), f"{name} vision tokens")
    finally:
        hook.remove()


def test_spliced_inputs_logits_and_loss(loaded):
    fixture, model = loaded
    for name in cases_for(fixture):
        case = case_of(fixture, name)
        pixels, sizes = fixture.images_of(case)
        ids = fixture.inputs[f"{name}.forward.lang_x"]
        mask = fixture.inputs[f"{name}.forward.attention_mask"]
        labels = fixture.inputs[f"{name}.forward.labels"]
        with torch.no_grad():
            spliced = model.model.embed_inputs(ids, mask, labels, pixels, sizes)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, labels=labels).loss
        valid = fixture.expected[f"{name}.forward.lm_attention_mask"].bool()
        assert torch.equal(spliced.attention_mask.bool(), valid), f"{name}: spliced attention masks differ"
        assert torch.equal(spliced.labels[valid], fixture.expected[f"{name}.forward.lm_labels"][valid])
        assert_close(
            spliced.inputs_embeds[valid],
            fixture.expected[f"{name}.forward.lm_inputs_embeds"][valid],
            f"{name} spliced embeddings",
        )
        assert_close(out.logits[valid], fixture.expected[f"{name}.forward.logits"][valid], f"{name} logits")
        assert abs(loss.item() - fixture.expected[f"{name}.forward.loss"].item()) <= ATOL, f"{name}: loss differs"


def test_processor_style_flat_inputs_match_nested(loaded):
    fixture, model = loaded
    for name in cases_for(fixture):
        case = case_of(fixture, name)
        pixels, sizes = fixture.images_of(case)
        if not any(pixels):
            continue
        ids = fixture.inputs[f"{name}.forward.lang_x"]
        mask = fixture.inputs[f"{name}.forward.attention_mask"]
        flat = dict(
            pixel_values=torch.cat([p for sample in pixels for p in sample]),
            image_sizes=torch.tensor([s for sample in sizes for s in sample]),
            num_images=torch.tensor([len(sample) for sample in pixels]),
            num_tiles=torch.tensor([len(p) for sample in pixels for p in sample]),
        )
        with torch.no_grad():
            nested = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
            flat_logits = model(input_ids=ids, attention_mask=mask, **flat).logits
        assert torch.equal(nested, flat_logits)


def test_greedy_generation_tokens_are_exact(loaded):
    fixture, model = loaded
    for name in cases_for(fixture):
        case = case_of(fixture, name)
        pixels, sizes = fixture.images_of(case)
        ids = fixture.inputs[f"{name}.generate.lang_x"]
        mask = fixture.inputs[f"{name}.generate.attention_mask"]
        kwargs = {k: v for k, v in case["generate"]["kwargs"].items() if v is not None}
        with torch.no_grad():
            spliced = model.model.embed_inputs(ids, mask, None, pixels, sizes, padding_side="left")
            new_tokens = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, **kwargs
            )
        valid = fixture.expected[f"{name}.generate.lm_attention_mask"].bool()
        assert torch.equal(spliced.attention_mask.bool(), valid), f"{name}: left-padded prompt masks differ"
        assert_close(
            spliced.inputs_embeds[valid], fixture.expected[f"{name}.generate.lm_inputs_embeds"][valid], f"{name} prompt"
        )
        assert new_tokens.tolist() == fixture.expected[f"{name}.generate.new_tokens"].tolist()


def test_cases_batched_together_match_each_case_alone(loaded):
    """All cases of a fixture in one ragged batch: right-padded forward, left-padded generation."""
    fixture, model = loaded
    cases = [case_of(fixture, name) for name in cases_for(fixture)]
    if len(cases) < 2:
        pytest.skip("needs two cases")
    rows, pixels, sizes = [], [], []
    for case in cases:
        ids, mask = (
            fixture.inputs[f"{case['name']}.forward.lang_x"],
            fixture.inputs[f"{case['name']}.forward.attention_mask"],
        )
        rows += [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        case_pixels, case_sizes = fixture.images_of(case)
        pixels += case_pixels
        sizes += case_sizes
    longest = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    right = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    left = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    left_mask = right_mask.flip(1)
    kwargs = {k: v for k, v in cases[0]["generate"]["kwargs"].items() if v is not None}
    with torch.no_grad():
        logits = model(input_ids=right, attention_mask=right_mask, pixel_values=pixels, image_sizes=sizes).logits
        tokens = model.generate(
            input_ids=left, attention_mask=left_mask, pixel_values=pixels, image_sizes=sizes, **kwargs
        )
    row = 0
    for case in cases:
        expected_logits = fixture.expected[f"{case['name']}.forward.logits"]
        valid = fixture.expected[f"{case['name']}.forward.lm_attention_mask"].bool()
        for b in range(len(expected_logits)):
            n = int(valid[b].sum())
            assert_close(logits[row, :n], expected_logits[b][valid[b]], f"{case['name']} sample {b} in a batch")
            expected_tokens = fixture.expected[f"{case['name']}.generate.new_tokens"][b].tolist()
            assert tokens[row, : len(expected_tokens)].tolist() == expected_tokens
            row += 1
