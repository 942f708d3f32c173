"""Noised-image negatives (the second DPO pass's data) and the safety data helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip3.data.loader import build_loader
from blip3.data.mixture import stable_seed
from blip3.posttrain.noised import NoisedSettings, alpha_bar, generate_answers, noise_image, write_noised_negatives
from blip3.posttrain.safety import sample_records, vlguard_to_llava
from blip3.posttrain.testing import preference_mixture, tiny_config, write_base_checkpoint, write_preference_pairs
from blip3.processing.chat import XGENMM_SYSTEM_PROMPT


def test_the_noise_follows_the_ddpm_schedule():
    assert alpha_bar(0) == 1.0
    assert alpha_bar(500) == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:500]))
    assert 0.07 < alpha_bar(500) < 0.09 and alpha_bar(1000) < 1e-4  # √ᾱ ≈ 0.28 at the default step
    assert all(alpha_bar(t) > alpha_bar(t + 100) for t in range(0, 900, 100))
    with pytest.raises(ValueError, match="noise step"):
        alpha_bar(1001)

    grey = Image.new("RGB", (64, 64), (128, 128, 128))  # pixel value ≈ 0 in [-1, 1]: no clipping to speak of
    noised = np.asarray(noise_image(grey, 100, np.random.default_rng(0)), dtype=np.float64) / 127.5 - 1
    assert noised.std() == pytest.approx(np.sqrt(1 - alpha_bar(100)), rel=0.05)  # below the clipping
    assert noised.mean() == pytest.approx(np.sqrt(alpha_bar(100)) * (128 / 127.5 - 1), abs=0.01)
    again = noise_image(grey, 300, np.random.default_rng(0))
    assert np.array_equal(np.asarray(again), np.asarray(noise_image(grey, 300, np.random.default_rng(0))))
    assert noise_image(grey, 0, np.random.default_rng(0)).tobytes() == grey.tobytes()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("noised")
    write_base_checkpoint(root / "model", tiny_config(), processor)
    return root, write_preference_pairs(root / "data", np.random.default_rng(1), num_pairs=6)


def test_noised_negatives_are_valid_preference_rows_with_the_models_own_answers(pairs, processor, tmp_path):
    root, source = pairs
    settings = NoisedSettings(noise_step=500, seed=3, batch_size=4, max_new_tokens=6)
    out = tmp_path / "noised.jsonl"
    counts = write_noised_negatives(root / "model", source, out, source.parent / "images", settings, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in source.read_text().splitlines()]
    assert counts.rows == 6 and counts.written + sum(counts.skipped.values()) == 6
    assert counts.skipped["no_image"] == 2 and counts.written >= 3  # rows 0 and 3 have no image to noise
    assert rows[:6] == originals  # the input rows first, unchanged
    new = rows[6:]
    assert len(new) == counts.written
    for row in new:
        original = next(o for o in originals if o["id"] == row["source_id"])
        assert row["id"] == original["id"] + "-noised"
        assert (row["prompt"], row["chosen"], row["images"]) == (
            original["prompt"],
            original["chosen"],
            original["images"],
        )
        assert row["rejected"] and row["rejected"] != original["chosen"]
        assert row["negative"] == {"kind": "noised-image", "noise_step": 500, "seed": 3}

    # the rejected answer is the model's greedy answer to the prompt with its images noised
    from blip3 import load_pretrained
    from blip3.data.formats import tokenize_preference_pair
    from blip3.data.records import PreferencePair

    model, _ = load_pretrained(root / "model")
    row = next(r for r in new if len(r["images"]) == 3)
    clean = [Image.open(source.parent / "images" / name).convert("RGB") for name in row["images"]]
    noised = [
        noise_image(image, 500, np.random.default_rng(stable_seed(3, row["source_id"], k)))
        for k, image in enumerate(clean)
    ]
    example = tokenize_preference_pair(
        PreferencePair("x", tuple(noised), row["prompt"], row["chosen"], "-"),
        processor,
        system_prompt=XGENMM_SYSTEM_PROMPT,
    )
    prompt = example.chosen
    prompt.input_ids, prompt.labels = example.prompt_input_ids, torch.full_like(example.prompt_input_ids, -100)
    assert generate_answers(model.eval(), processor, [prompt], 6) == [row["rejected"]]

    # and the file trains: the loader reads every row as a preference pair
    loader = build_loader(
        preference_mixture(out, image_root=source.parent / "images"), processor, batch_size=4, epochs=1
    )
    keys = [key for batch in loader for key in batch["sample_keys"]]
    assert sorted(keys) == sorted(f"pairs:noised.jsonl#{index}" for index in range(len(rows)))
    assert not loader.counts.skipped


def test_the_command_writes_only_the_new_rows_when_asked(pairs, tmp_path, capsys):
    from blip3.cli import main

    root, source = pairs
    out = tmp_path / "only-new.jsonl"
    args = ["post-train", "noised-negatives", str(root / "model"), str(source), str(out), "--only-new"]
    main([*args, "--image-root", str(source.parent / "images"), "--max-new-tokens", "4", "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(row["id"].endswith("-noised") for row in rows)
    assert f"{len(rows)} noised-image negatives from 6 rows" in capsys.readouterr().out
    assert not out.with_name(out.name + ".tmp").exists()

    # closed questions left out: prompts whose chosen answer is shorter than 4 words get no negative
    short = tmp_path / "long-answers-only.jsonl"
    main([*args[:4], str(short), "--only-new", "--min-chosen-words", "4", "--image-root", str(source.parent / "images"),
          "--max-new-tokens", "4", "--device", "cpu"])  # fmt: skip
    long_ids = {r["id"] for r in map(json.loads, source.read_text().splitlines()) if len(r["chosen"].split()) >= 4}
    kept = [json.loads(line) for line in short.read_text().splitlines()]
    assert kept and {row["source_id"] for row in kept} <= long_ids
    assert '"short_chosen": 2' in capsys.readouterr().out  # the two one-image rows answered in three words


def test_vlguard_becomes_conversations_with_a_safe_field():
    records = [
        {
            "id": "a",
            "image": "bad_ads/1.png",
            "safe": False,
            "harmful_category": "deception",
            "instr-resp": [{"instruction": "How do I run this scam?", "response": "I cannot help with that."}],
        },
        {
            "id": "b",
            "image": "safe/2.png",
            "safe": True,
            "instr-resp": [
                {"safe_instruction": "What is in the picture?", "response": "A dog on a beach."},
                {"unsafe_instruction": "How do I hurt this dog?", "response": "I cannot help with that."},
            ],
        },
    ]
    out = vlguard_to_llava(records)
    assert [(r["id"], r["safe"]) for r in out] == [("a-0", False), ("b-0", True), ("b-1", False)]
    assert out[1]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A dog on a beach."},
    ]
    assert all(r["image"] == records[r["id"] == "b-0" or r["id"] == "b-1"]["image"] for r in out)
    with pytest.raises(ValueError, match="instr-resp"):
        vlguard_to_llava([{"id": "c", "image": "x.png", "safe": True, "instr-resp": [{"question": "?"}]}])


def test_a_sft_sample_is_seeded_and_keeps_the_original_order():
    records = list(range(100))
    sample = sample_records(records, 10, seed=1)
    assert len(sample) == 10 and sample == sorted(sample) and sample == sample_records(records, 10, seed=1)
    assert sample != sample_records(records, 10, seed=2)
    assert sample_records(records, 500) == records
