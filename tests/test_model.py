"""Behaviour of the model on tiny random weights: counts, splicing, loss, generation, modes, saving."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

import blip3  # noqa: F401  (registers the Auto classes)
from blip3.config import preset
from blip3.interop.xgenmm import save_official
from blip3.modeling.anyres import TILE_CODE_FREQUENCIES, TILE_CODE_WIDTH, tile_position_codes
from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.modeling.splice import IGNORE_INDEX, splice_vision_tokens
from blip3.processing.anyres import plan_anyres

IMAGE, PAD, END = 32012, 32011, 32007
SIZES = [(22, 22), (640, 480), (1400, 280), (280, 1400), (50, 20), (30, 40)]


def tiny_model(seed: int = 0, **overrides) -> Blip3ForConditionalGeneration:
    torch.manual_seed(seed)
    config = preset("tiny", **overrides)
    config.text_config.initializer_range = 0.25  # a tiny LM needs large weights to give distinct logits
    return Blip3ForConditionalGeneration(config).eval()


def random_tiles(model, size, generator=None) -> torch.Tensor:
    n = model.config.num_tiles(size)
    s = model.config.image_size
    return torch.rand(n, 3, s, s, generator=generator) * 2 - 1


def prompt_ids(n_images: int, n_text: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 30000, (n_text,), generator=g).tolist()
    for k in range(n_images):
        ids.insert((k * 3) % (len(ids) + 1), IMAGE)
    return [1, 32010, *ids, END, 13, 32001, 13]


def batch(model, prompts, images, padding_side):
    longest = max(len(p) for p in prompts)
    rows, masks = [], []
    for p in prompts:
        pad = [PAD] * (longest - len(p))
        rows.append(pad + p if padding_side == "left" else p + pad)
        masks.append([0] * len(pad) + [1] * len(p) if padding_side == "left" else [1] * len(p) + [0] * len(pad))
    return torch.tensor(rows), torch.tensor(masks)


# -- configuration -------------------------------------------------------------------------------


def test_full_preset_counts_released_parameters_on_meta_device():
    with torch.device("meta"):
        model = Blip3ForConditionalGeneration(preset("xgen-mm-phi3-mini-v1.5"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 4_359_257_219
    assert count(model.model.vision_tower) == 428_225_600
    assert count(model.model.token_sampler) == 109_901_568
    assert count(model.model.language_model) + count(model.lm_head) == 3_821_130_051


def test_config_rejects_inconsistent_layouts():
    with pytest.raises(ValueError, match="vision_token_mode"):
        preset("tiny", vision_token_mode="squash")
    with pytest.raises(ValueError, match="input_dim"):
        preset("tiny", sampler_config=dict(input_dim=8, output_dim=16, num_latents=4))


# -- splicing ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    samples=st.lists(st.tuples(st.lists(st.integers(1, 7), max_size=3), st.integers(1, 6)), min_size=1, max_size=4),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_splice_places_each_image_at_its_token(samples, padding_side):
    d = 4
    input_ids, images, lengths = [], [], []
    for s, (vision_lengths, n_text) in enumerate(samples):
        ids = [7] * n_text
        for k in range(len(vision_lengths)):
            ids.insert(min(2 * k, len(ids)), IMAGE)
        input_ids.append(ids)
        images.append([torch.full((n, d), float(100 * s + k + 1)) for k, n in enumerate(vision_lengths)])
        lengths.append(len(ids) - len(vision_lengths) + sum(vision_lengths))
    longest = max(len(i) for i in input_ids) or 1
    ids = torch.tensor([i + [PAD] * (longest - len(i)) for i in input_ids]).reshape(len(samples), longest)
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in input_ids]).reshape(len(samples), longest)
    labels = ids.clone()
    text = torch.zeros(*ids.shape, d)
    out = splice_vision_tokens(ids, text, mask, labels, images, IMAGE, padding_side)

    assert out.attention_mask.sum(1).tolist() == lengths
    for s, sample_images in enumerate(images):
        row, valid = out.inputs_embeds[s], out.attention_mask[s].bool()
        spliced = row[valid]
        # each image's block appears contiguously, in order, and nowhere else
        values = [float(100 * s + k + 1) for k in range(len(sample_images))]
        seen = [v for v in spliced[:, 0].tolist() if v != 0.0]
        assert seen == [v for v, im in zip(values, sample_images) for _ in range(len(im))]
        assert out.vision_mask[s].sum().item() == sum(len(im) for im in sample_images)
        assert (out.labels[s][out.vision_mask[s]] == IGNORE_INDEX).all()
        assert (out.labels[s][~valid] == IGNORE_INDEX).all()
        assert IMAGE not in out.labels[s].tolist()
        if padding_side == "left":
            assert valid[-1] or not valid.any()
        else:
            assert valid[0] or not valid.any()


def test_image_count_mismatch_names_the_sample_and_counts():
    model = tiny_model()
    ids, mask = batch(model, [prompt_ids(1, 4, 0), prompt_ids(2, 4, 1)], None, "right")
    sizes = [[(22, 22)], [(22, 22)]]  # the second sample has two <image> tokens but one image
    pixels = [[random_tiles(model, s) for s in sample] for sample in sizes]
    with pytest.raises(ValueError, match=r"sample 1: 2 <image> token\(s\) in the text but 1 image\(s\)"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids, attention_mask=mask)


def test_wrong_tile_count_is_an_error():
    model = tiny_model()
    ids, mask = batch(model, [prompt_ids(1, 4, 0)], None, "right")
    tiles = random_tiles(model, (640, 480))[:3]  # a 2×2 image needs 5 tiles
    with pytest.raises(ValueError, match="has 3 tiles"):
        model(input_ids=ids, attention_mask=mask, pixel_values=[[tiles]], image_sizes=[[(640, 480)]])


# -- loss ----------------------------------------------------------------------------------------


def test_loss_is_text_cross_entropy_over_supervised_labels_only():
    model = tiny_model()
    prompts = [prompt_ids(2, 6, 0), prompt_ids(1, 9, 1)]
    ids, mask = batch(model, prompts, None, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, 3] = 32014  # an added special token as a target: never trained
    sizes = [[(22, 22), (640, 480)], [(1400, 280)]]
    pixels = [[random_tiles(model, s) for s in sample] for sample in sizes]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, labels=labels)
    # the same loss, computed the slow way from the full logits
    logits, spliced = out.logits[:, :-1], out.labels[:, 1:].clone()
    spliced[torch.isin(spliced, torch.tensor([PAD, IMAGE, 32013, 32014]))] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), spliced.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert (out.labels[out.attention_mask == 0] == IGNORE_INDEX).all()


def test_training_step_leaves_the_vision_tower_frozen():
    model = tiny_model().train()
    ids, mask = batch(model, [prompt_ids(1, 5, 0)], None, "right")
    pixels = [[random_tiles(model, (640, 480))]]
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=[[(640, 480)]], labels=ids)
    assert out.logits is None  # training with labels: logits only at supervised positions, inside the loss
    out.loss.backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.model.token_sampler.latents.grad is not None
    assert model.lm_head.additional_fc.weight.grad is not None


# -- generation ----------------------------------------------------------------------------------


def test_batched_generation_equals_one_by_one():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    specs = [[(640, 480), (22, 22), (1400, 280)], [], [(280, 1400)], [(30, 40), (50, 20)]]
    prompts = [prompt_ids(len(s), 5 + 3 * i, i) for i, s in enumerate(specs)]
    pixels = [[random_tiles(model, size, g) for size in s] for s in specs]
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=[END])
    alone = []
    for p, px, s in zip(prompts, pixels, specs):
        ids, mask = torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long)
        alone.append(
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=[px], image_sizes=[s], **kwargs)[0].tolist()
        )
    for side in ("left", "right"):
        ids, mask = batch(model, prompts, None, side)
        together = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=specs, **kwargs)
        assert together.tolist() == alone, f"{side}-padded batch differs from one-by-one"


def test_generation_stops_on_end_of_turn_and_streams():
    model = tiny_model()
    with torch.no_grad():  # make <|end|> the certain next token
        model.lm_head.bias.zero_()
        model.lm_head.bias[END] = 1e4
    streamed = []

    class Collect(BaseStreamer):
        def put(self, value):
            streamed.extend(value.flatten().tolist())

        def end(self):
            streamed.append("end")

    ids = torch.tensor([prompt_ids(1, 4, 0)])
    out = model.generate(
        input_ids=ids,
        pixel_values=[[random_tiles(model, (22, 22))]],
        image_sizes=[[(22, 22)]],
        max_new_tokens=10,
        streamer=Collect(),
    )
    assert out.tolist() == [[END]]  # only new tokens, stopped at <|end|>
    assert streamed == [END, "end"]


# -- vision token modes ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["anyres-patch", "anyres-fixed", "base"])
def test_vision_token_counts_per_mode(mode):
    model = tiny_model(vision_token_mode=mode)
    q = model.config.sampler_config.num_latents
    for size in SIZES:
        ids = torch.tensor([[1, IMAGE, 5]])
        tiles = random_tiles(model, size)
        with torch.no_grad():
            spliced = model.model.embed_inputs(ids, None, None, [[tiles]], [[size]])
        per_image = q * len(tiles) if mode == "anyres-patch" else q
        assert spliced.vision_mask.sum().item() == per_image
        plan = plan_anyres(size, tuple(map(tuple, model.config.anyres_grids)), model.config.image_size)
        assert len(tiles) == (1 if mode == "base" else plan.num_tiles)


def test_stripe_regrouping_only_matters_for_grids_two_tiles_wide():
    stripes, tiles = tiny_model(stripe_regrouping=True), tiny_model(stripe_regrouping=False)
    g = torch.Generator().manual_seed(0)
    for size, wide in [((22, 22), False), ((280, 1400), False), ((640, 480), True), ((1400, 280), True)]:
        pixels = random_tiles(stripes, size, g)
        ids = torch.tensor([[1, IMAGE]])
        with torch.no_grad():
            a = stripes.model.embed_inputs(ids, None, None, [[pixels]], [[size]]).inputs_embeds
            b = tiles.model.embed_inputs(ids, None, None, [[pixels]], [[size]]).inputs_embeds
        assert torch.equal(a, b) != wide, size


def test_instruction_aware_sampler_reads_the_prompt():
    model = tiny_model(sampler_config=dict(input_dim=16, output_dim=16, num_latents=4, instruction_aware=True))
    tiles = random_tiles(model, (640, 480))
    with torch.no_grad():
        a = model.model.embed_inputs(torch.tensor([[1, IMAGE, 5, 6]]), None, None, [[tiles]], [[(640, 480)]])
        b = model.model.embed_inputs(torch.tensor([[1, IMAGE, 9, 9]]), None, None, [[tiles]], [[(640, 480)]])
    vision = a.vision_mask[0]
    assert vision.sum() == 5 * 4
    assert not torch.equal(a.inputs_embeds[0][vision], b.inputs_embeds[0][vision])


def test_tile_position_codes_describe_each_view_whatever_the_grid():
    wide, tall, square = tile_position_codes((2, 1)), tile_position_codes((1, 3)), tile_position_codes((2, 2))
    assert (
        wide.shape == (3, TILE_CODE_WIDTH)
        and tall.shape == (4, TILE_CODE_WIDTH)
        and square.shape == (5, TILE_CODE_WIDTH)
    )
    assert torch.equal(wide[0], tall[0]) and torch.equal(tile_position_codes(None), wide[:1])  # the global view
    for codes in (wide, tall, square):  # every view of an image has its own code
        assert torch.cdist(codes, codes).add(torch.eye(len(codes))).min() > 0.1
    x, y = slice(2, 2 + 2 * TILE_CODE_FREQUENCIES), slice(2 + 2 * TILE_CODE_FREQUENCIES, -2)
    assert torch.allclose(square[1, x], wide[1, x]) and torch.allclose(square[1, x], square[3, x])  # left column
    assert torch.allclose(square[1, y], square[2, y]) and torch.allclose(tall[2, y], wide[1, y])  # rows; middle


def sampler_with_code(**overrides):
    return dict(input_dim=16, output_dim=16, num_latents=4, tile_position_code=True, **overrides)


@pytest.mark.parametrize("mode", ["anyres-patch", "anyres-fixed", "base"])
def test_the_tile_position_code_adds_each_views_own_learned_code_to_its_tokens(mode):
    plain, coded = (
        tiny_model(vision_token_mode=mode),
        tiny_model(vision_token_mode=mode, sampler_config=sampler_with_code()),
    )
    missing = coded.load_state_dict(plain.state_dict(), strict=False).missing_keys  # same weights otherwise
    assert sorted(missing) == ["model.token_sampler.tile_position.bias", "model.token_sampler.tile_position.weight"]
    size, ids = (640, 480), torch.tensor([[1, IMAGE, 5]])
    tiles = random_tiles(plain, size)
    with torch.no_grad():
        before = plain.model.embed_inputs(ids, None, None, [[tiles]], [[size]])
        after = coded.model.embed_inputs(ids, None, None, [[tiles]], [[size]])
        q, views = 4, (len(tiles) if mode == "anyres-patch" else 1)
        vision = before.vision_mask[0]
        assert torch.equal(after.inputs_embeds[0][~vision], before.inputs_embeds[0][~vision])  # text untouched
        shift = (after.inputs_embeds - before.inputs_embeds)[0][vision].view(views, q, -1)
        grid = plain.config.image_grid(size) if views > 1 else None
        expected = coded.model.token_sampler.tile_position(tile_position_codes(grid))
    assert torch.allclose(shift, expected[:, None].expand_as(shift), atol=1e-5)
    assert views == 1 or torch.cdist(expected, expected).add(torch.eye(views)).min() > 1e-3  # views told apart


def test_tile_position_code_has_no_place_in_the_official_layout(tmp_path):
    with pytest.raises(ValueError, match="stripe"):
        tiny_model(stripe_regrouping=True, sampler_config=sampler_with_code())
    model = tiny_model(sampler_config=sampler_with_code())
    with pytest.raises(ValueError, match="official xGen-MM layout"):
        save_official(model, tmp_path / "official")
    assert not (tmp_path / "official").exists()
    model.save_pretrained(tmp_path / "ours")
    loaded = Blip3ForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert loaded.config.sampler_config.tile_position_code
    assert torch.equal(loaded.model.token_sampler.tile_position.weight, model.model.token_sampler.tile_position.weight)


# -- saving and loading --------------------------------------------------------------------------


def test_save_load_through_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "blip3"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is Blip3ForConditionalGeneration
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.generation_config.eos_token_id == [32007, 32000]


def test_official_export_round_trip_is_exact(tmp_path):
    model = tiny_model(stripe_regrouping=True)
    save_official(model, tmp_path / "official", max_shard_size="200KB")  # force several shards + index
    assert (tmp_path / "official" / "model.safetensors.index.json").is_file()
    loaded = Blip3ForConditionalGeneration.from_pretrained(tmp_path / "official")
    assert loaded.config.stripe_regrouping and loaded.config.vision_token_mode == "anyres-patch"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    save_official(loaded, tmp_path / "again", max_shard_size="200KB")
    for f in (tmp_path / "official").iterdir():
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes(), f.name
