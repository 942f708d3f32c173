"""The caption probe: the words it picks out of a caption, and its reading of logits over the spliced sequence."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from blip3 import Blip3ForConditionalGeneration
from blip3.processing.processor import Blip3Processor
from blip3.synthetic.caption_probe import CATEGORIES, caption_words, probe_captions, world_test_captions
from blip3.synthetic.config import tiny_world_config
from blip3.synthetic.tokenizer import load_world_tokenizer
from blip3.synthetic.write import WorldSizes, build_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_caption_words_are_colours_shapes_by_held_out_pair_and_quoted_text():
    caption = (
        'The image shows a red star at the top, a blue circle on the left and the small text "NEXT" in the middle.'
    )
    words = caption_words(caption, held_out=[("red", "star")])
    assert [(category, caption[start:end]) for category, start, end in words] == [
        ("colour", "red"),
        ("shape/held-out", "star"),
        ("colour", "blue"),
        ("shape/seen", "circle"),
        ("text", "NEXT"),
    ]
    assert caption_words("Here are 2 pictures of shapes.", held_out=[]) == []


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A smoke world with an untrained tiny model of its vocabulary (seconds)."""
    root = tmp_path_factory.mktemp("probe")
    build_world(root, WorldSizes.smoke(), seed=0, workers=1, progress=False)
    tokenizer = load_world_tokenizer(root)
    config = tiny_world_config(
        tokenizer, vision_width=32, vision_layers=1, vision_heads=2, text_width=48, text_layers=1
    )
    torch.manual_seed(0)
    return root, Blip3ForConditionalGeneration(config).eval(), Blip3Processor.from_config(config, tokenizer)


class _Predicts:
    """A model whose most likely next token at every position is `choose(spliced labels, position)`.

    The labels come from the model's own splicing (`embed_inputs`), not from the probe's arithmetic.
    """

    def __init__(self, model, choose):
        self.model, self.choose = model, choose

    def eval(self):
        return self

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **inputs):
        spliced = self.model.model.embed_inputs(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["input_ids"].clone(),
            inputs["pixel_values"],
            inputs["image_sizes"],
            inputs["num_images"],
            inputs["num_tiles"],
        )
        labels = spliced.labels[0]
        logits = torch.zeros(1, len(labels), self.model.config.text_config.vocab_size + 3)
        for position in range(len(labels)):
            logits[0, position, self.choose(labels, position)] = 1.0
        return SimpleNamespace(logits=logits)


def test_a_model_that_predicts_every_next_token_scores_100_and_one_that_predicts_none_scores_0(world_model):
    root, model, processor = world_model
    samples, held_out = world_test_captions(root)
    assert samples and held_out

    def next_token(labels, position):
        following = labels[position + 1] if position + 1 < len(labels) else -100
        return int(following) if following >= 0 else 0

    perfect = probe_captions(_Predicts(model, next_token), processor, samples, held_out, progress=False)
    assert perfect.captions == len(samples)
    assert sum(perfect.total.values()) > 0
    for category in CATEGORIES:
        if perfect.total[category]:
            assert perfect.accuracy(category) == 100.0, category

    # The token after the true next one: wrong everywhere a word's token does not repeat its successor.
    def one_late(labels, position):
        return next_token(labels, position + 1)

    late = probe_captions(_Predicts(model, one_late), processor, samples, held_out, progress=False)
    assert late.total == perfect.total and sum(late.right.values()) == 0


def test_the_command_writes_a_table_and_json(world_model, tmp_path, capsys):
    from blip3.cli import main

    root, model, processor = world_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    main(
        [
            "probe-captions",
            str(tmp_path / "model"),
            "--world",
            str(root),
            "--limit",
            "3",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    numbers = json.loads((tmp_path / "p.json").read_text())
    assert numbers["captions"] == 3 and set(CATEGORIES) <= set(numbers)
    assert "shape/held-out" in capsys.readouterr().out
