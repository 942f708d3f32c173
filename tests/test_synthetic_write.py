"""The world on disk: determinism, the schemas the readers take, held-out splits, tokenizer, model agreement."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from blip3 import Blip3ForConditionalGeneration, Blip3Processor
from blip3.cli import main
from blip3.synthetic import tasks
from blip3.synthetic.config import tiny_world_config
from blip3.synthetic.tokenizer import load_world_tokenizer
from blip3.synthetic.world import COLOURS, SHAPES, TEXT_ALPHABET, WorldSpec
from blip3.synthetic.write import WorldSizes, build_world, ordinary_scene, write_test_split

SIZES = WorldSizes.smoke()
HELD_OUT_PHRASES = [f"{colour} {kind}" for colour, kind in WorldSpec().held_out_pairs]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    main(["world", str(root), "--sizes", "smoke", "--seed", "0", "--workers", "1"])
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes}, split at the first dot as webdataset does."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def shard_paths(world: Path, kind: str) -> list[Path]:
    return [world / p for p in json.loads((world / "manifest.json").read_text())["files"][kind]]


def load_json(world: Path, relative: str):
    path = world / relative
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


def is_box(box) -> bool:
    return len(box) == 4 and all(0 <= v <= 1 for v in box) and box[0] < box[2] and box[1] < box[3]


def test_the_world_is_a_function_of_the_seed(world, tmp_path):
    # In parallel processes or not, the same seed writes the same bytes; another seed, other data.
    build_world(tmp_path / "again", SIZES, seed=0, workers=2, progress=False)
    assert tree(tmp_path / "again") == tree(world)
    build_world(tmp_path / "other", SIZES, seed=1, workers=1, progress=False)
    other, ours = tree(tmp_path / "other"), tree(world)
    assert {k for k in other if not k.startswith("images/")} == {k for k in ours if not k.startswith("images/")}
    assert other["sft/single.json"] != ours["sft/single.json"]


def test_tag_lists_add_their_own_files_and_change_only_the_sft_replay(world, tmp_path):
    # `blip3 demo --tags` must share the default run's tokenizer (and so its stage 0 and pre-training)
    build_world(tmp_path / "untagged", replace(SIZES, tags=0), seed=0, workers=1, progress=False)
    untagged, tagged = tree(tmp_path / "untagged"), tree(world)
    tag_files = {k for k in tagged if k.startswith(("pretrain/tags/", "pretrain/tags-absent/"))} | {"tags.yaml"}
    assert tag_files - {"tags.yaml"} and set(untagged) == set(tagged) - tag_files
    changed = {k for k in untagged if untagged[k] != tagged[k]}
    assert changed == {"manifest.json", "sft.yaml"}  # the manifest names the tag lists; SFT replays them
    weights = {
        name: {source["name"]: source["weight"] for source in yaml.safe_load(files["sft.yaml"])["sources"]}
        for name, files in (("untagged", untagged), ("tagged", tagged))
    }
    assert weights["untagged"] == {"sft_single": 0.8, "captions": 0.2}
    assert weights["tagged"] == {"sft_single": 0.8, "captions": 0.1, "tags_absent": 0.1}


def test_caption_ocr_and_grounding_shards_follow_the_schema(world):
    for path in shard_paths(world, "captions/train"):
        for key, members in tar_samples(path).items():
            assert set(members) == {"png", "txt", "json"} and "." not in key
            assert members["txt"].decode().strip()
            assert Image.open(io.BytesIO(members["png"])).format == "PNG"
    for path in shard_paths(world, "ocr"):
        for members in tar_samples(path).values():
            annotation = json.loads(members["json"])
            assert set(members) == {"png", "json"} and annotation["ocr"]
            for region in annotation["ocr"]:
                assert set(region["text"]) <= set(TEXT_ALPHABET) and is_box(region["box"])
                assert f'"{region["text"]}"' in annotation["caption"]
    for path in shard_paths(world, "grounding"):
        for members in tar_samples(path).values():
            annotation = json.loads(members["json"])
            assert annotation["caption"] and annotation["objects"]
            for obj in annotation["objects"]:
                assert obj["phrase"] in annotation["caption"] and is_box(obj["box"])
    assert sum(len(tar_samples(p)) for p in shard_paths(world, "captions/train")) == SIZES.captions
    tags = [members for path in shard_paths(world, "tags") for members in tar_samples(path).values()]
    assert len(tags) == SIZES.tags
    for members in tags:  # new scenes, each tag 'kind colour' of one of its shapes
        scene = json.loads(members["json"])["scene"]
        caption = members["txt"].decode()
        listed = Counter(tuple(tag.split()) for tag in caption.removeprefix("Shapes: ").removesuffix(".").split(", "))
        assert listed == Counter((o["kind"], o["colour"]) for o in scene["objects"])
    with_absent = [members for path in shard_paths(world, "tags_absent") for members in tar_samples(path).values()]
    assert [m["png"] for m in with_absent] == [m["png"] for m in tags]  # the same images, for SFT to replay
    for plain, members in zip(tags, with_absent):  # the same list, then one pair the scene does not hold
        scene = json.loads(members["json"])["scene"]
        caption, absent = members["txt"].decode().split(" Absent: ")
        kind, colour = absent.removesuffix(".").split()
        assert caption == plain["txt"].decode() and kind in SHAPES and colour in COLOURS
        assert (colour, kind) not in {(o["colour"], o["kind"]) for o in scene["objects"]}
    assert len(shard_paths(world, "captions/train")) == -(-SIZES.captions // SIZES.shard_size)


def test_some_ordinary_scenes_show_a_hazard_sign_that_captions_name_and_do_not_count(world):
    # so that the model has seen the sign (and not counted it as a shape) before safety tuning
    scenes = [
        json.loads(members["json"])
        for path in shard_paths(world, "captions/train")
        for members in tar_samples(path).values()
    ]
    with_sign = [s for s in scenes if s["scene"]["hazard"] is not None]
    assert 0 < len(with_sign) < len(scenes) / 3
    for sample in with_sign:
        assert "warning sign" in sample["short_caption"] and "warning sign" in sample["dense_caption"]
        count = len(sample["scene"]["objects"])
        assert sample["dense_caption"].endswith(f"There {'is 1 shape' if count == 1 else f'are {count} shapes'}.")
    # SFT conversations draw their scenes the same way, at the same rate
    rng = random.Random(0)
    drawn = [ordinary_scene(rng, WorldSpec(), 0.5, SIZES.hazard_rate) for _ in range(400)]
    assert 0.05 < sum(scene.hazard is not None for scene in drawn) / len(drawn) < 0.15


def test_interleaved_documents_align_texts_and_images(world):
    for path in shard_paths(world, "interleaved"):
        for members in tar_samples(path).values():
            document = json.loads(members["json"])
            texts, images = document["texts"], document["images"]
            assert len(texts) == len(images) >= 4
            assert all((t is None) != (i is None) for t, i in zip(texts, images))
            named = [i for i in images if i is not None]
            assert sorted(named) == sorted(m for m in members if m.endswith(".png")) and len(named) >= 2


def test_conversations_follow_the_llava_schema_with_their_metadata(world):
    files = ["sft/single.json", "sft/multi.json", "sft/safety.json"]
    files += [
        f"eval/{split}/{name}.json"
        for split in ("validation", "test")
        for name in ("single", "multi", "pope", "safety")
    ]
    ids = []
    for relative in files:
        for record in load_json(world, relative):
            ids.append(record["id"])
            images = record["image"] if isinstance(record["image"], list) else [record["image"]]
            assert all((world / "images" / image).is_file() for image in images)
            roles = [m["from"] for m in record["conversations"]]
            assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
            assert record["conversations"][0]["value"].count("<image>") == len(images)
            assert sum(m["value"].count("<image>") for m in record["conversations"]) == len(images)
            assert record["split"] in relative or relative.startswith("sft/")
            if relative.startswith("eval/"):  # one question, its reply the canonical answer
                assert len(roles) == 2 and record["conversations"][1]["value"] == record["answer"]
            else:
                assert record["conversations"][1]["value"] == record["answer"] or record["task"] == "caption"
            if record["task"] == "grounding":
                assert is_box(record["box"])
            if "safety" in relative:
                assert record["safe"] == (record["safety_kind"] != "harmful")
                assert tasks.is_refusal(record["answer"]) == (not record["safe"])
    assert len(ids) == len(set(ids))


def test_training_existence_questions_are_balanced_between_yes_and_no(world):
    answers = Counter(
        turn["answer"]
        for record in load_json(world, "sft/single.json")
        for turn in record.get("turns", [{"task": record["task"], "answer": record["answer"]}])
        if turn["task"] == "existence"
    )
    assert answers["yes"] >= 3 and abs(answers["yes"] - answers["no"]) <= 1, answers


def test_multi_image_conversations_ask_several_different_questions(world):
    records = load_json(world, "sft/multi.json")
    turns = [[turn["task"] for turn in record.get("turns", [{"task": record["task"]}])] for record in records]
    assert all(len(asked) == len(set(asked)) <= SIZES.multi_turns for asked in turns)
    assert all(set(asked) <= set(tasks.MULTI_IMAGE_TASKS) for asked in turns)
    assert sum(len(asked) > 1 for asked in turns) >= len(records) / 2


def test_evaluation_sets_cover_every_task_with_the_right_counts(world):
    single = load_json(world, "eval/test/single.json")
    assert Counter(r["task"] for r in single) == {task: SIZES.test_per_task for task in tasks.SINGLE_IMAGE_TASKS}
    multi = load_json(world, "eval/test/multi.json")
    assert Counter(r["task"] for r in multi) == {task: SIZES.test_per_task for task in tasks.MULTI_IMAGE_TASKS}
    assert all(2 <= len(r["image"]) <= 4 for r in multi)
    pope = load_json(world, "eval/test/pope.json")
    for category in tasks.POPE_CATEGORIES:
        answers = Counter(r["answer"] for r in pope if r["category"] == category)
        assert answers == {"yes": SIZES.pope_test_per_category, "no": SIZES.pope_test_per_category}
        official = load_json(world, f"eval/test/pope_{category}.jsonl")
        assert [set(line) for line in official] == [{"question_id", "image", "text", "label"}] * len(official)
        assert Counter(line["label"] for line in official) == answers
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["counts"]["test"]["ocr_small"] == SIZES.test_per_task
    # Single-image questions are reported by how many shapes their image holds, too.
    for record in single + pope:
        assert set(record["facets"]) == {"shapes"} and 0 <= record["facets"]["shapes"] <= WorldSpec().max_cells
    every_shape = [r for r in single if r["conversations"][0]["value"].endswith("How many shapes are there?")]
    assert every_shape and all(r["facets"]["shapes"] == int(r["answer"]) for r in every_shape)
    assert len({r["facets"]["shapes"] for r in single}) > 1


def test_caption_questions_say_what_their_image_holds_so_captions_are_scored_with_chair(world):
    from blip3.evaluation import load_synthetic
    from blip3.evaluation.metrics import named_objects
    from blip3.synthetic.world import object_vocabulary

    records = load_json(world, "eval/test/single.json")
    captions = [r for r in records if r["task"] == "caption"]
    assert captions and all("objects" not in r for r in records if r["task"] != "caption")
    for record in captions:  # the reference caption names exactly the objects, in reading order
        assert named_objects(record["answer"], object_vocabulary()) == record["objects"]
    items = [item for item in load_synthetic(world / "eval" / "test" / "single.json") if item.task == "caption"]
    assert [item.objects for item in items] == [r["objects"] for r in captions]
    assert len({id(item.object_vocabulary) for item in items}) == 1  # one vocabulary, shared


def names_held_out_pair(question: str, answer: str) -> bool:
    """Whether a question and its answer together name a held-out pair ("the green one?" "triangle").

    A caption lists many objects, so only the phrase itself counts there.
    """
    if answer.startswith("The image shows"):
        return any(phrase in answer for phrase in HELD_OUT_PHRASES)
    words = set(re.findall(r"[a-z]+", f"{question} {answer}".lower()))
    return any({colour, kind} <= words or {colour, kind + "s"} <= words for colour, kind in WorldSpec().held_out_pairs)


def test_held_out_pairs_are_asked_only_in_the_test_split(world):
    for relative in ("sft/single.json", "sft/multi.json", "sft/safety.json", "eval/validation/single.json"):
        for record in load_json(world, relative):
            assert not record["held_out"]
            messages = [m["value"] for m in record["conversations"]]
            for question, answer in zip(messages[::2], messages[1::2]):
                assert not names_held_out_pair(question, answer), (relative, question, answer)
    for record in load_json(world, "preference/train.jsonl"):
        assert not any(p in record["chosen"] + record["rejected"] + record["prompt"] for p in HELD_OUT_PHRASES)
    test = load_json(world, "eval/test/single.json") + load_json(world, "eval/test/multi.json")
    held = [r for r in test if r["held_out"]]
    focusable = {"colour", "shape", "position", "existence", "grounding", "multi_which", "multi_colour", "caption"}
    assert held and {r["task"] for r in held} <= focusable


def test_sft_stages_replay_pretraining_captions_which_show_the_held_out_pairs(world):
    """The SFT questions never name a held-out pair (above); the captions replayed beside them show every
    one, so SFT data does not say that they never occur (docs/demo-findings.md: "SFT taught the model ...")."""
    manifest = json.loads((world / "manifest.json").read_text())
    pretrain = yaml.safe_load((world / manifest["mixtures"]["pretrain"]).read_text())
    (pretrain_captions,) = [s for s in pretrain["sources"] if s["format"] == "caption"]
    for stage in ("sft", "multi_image_sft"):
        sources = yaml.safe_load((world / manifest["mixtures"][stage]).read_text())["sources"]
        (replayed,) = [s for s in sources if s["name"] == "captions"]
        assert replayed["path"] == pretrain_captions["path"] and replayed["weight"] > 0
        replay = sum(s["weight"] for s in sources if s["format"] == "caption")  # captions, and tag lists in SFT
        assert replay <= 0.25 * sum(s["weight"] for s in sources)  # mostly questions still
    captions = [
        sample["txt"].decode() for path in shard_paths(world, "captions/train") for sample in tar_samples(path).values()
    ]
    shown = {phrase for phrase in HELD_OUT_PHRASES if any(phrase in caption for caption in captions)}
    assert shown == set(HELD_OUT_PHRASES)


def test_preference_pairs_follow_the_jsonl_schema(world):
    for split in ("train", "validation"):
        records = load_json(world, f"preference/{split}.jsonl")
        assert len(records) == 2 * (SIZES.preference if split == "train" else SIZES.preference_validation)
        for record in records:
            assert record["prompt"].startswith("<image>\n") and len(record["images"]) == 1
            assert (world / "images" / record["images"][0]).is_file()
            assert record["chosen"] != record["rejected"]
        # each image: a caption pair, whose rejected caption names an object the image does not hold, then a
        # yes / no pair about one object on the same image
        for caption, existence in zip(records[::2], records[1::2]):
            assert caption["task"] == "preference_caption" and caption["hallucinated"]
            assert all(
                ghost in caption["rejected"] and ghost not in caption["chosen"] for ghost in caption["hallucinated"]
            )
            assert existence["task"] == "preference_existence" and existence["images"] == caption["images"]
            assert existence["id"] == caption["id"] + "-existence"
            assert {existence["chosen"], existence["rejected"]} == {"yes", "no"}
            asked = (
                existence["prompt"].removeprefix("<image>\nIs there ").removesuffix(" in the image?").split(" ", 1)[1]
            )
            assert (asked in existence["objects_present"]) == (existence["chosen"] == "yes")
            assert existence["hallucinated"] == ([] if existence["chosen"] == "yes" else [asked])


def test_mixtures_name_existing_files_and_the_data_readers_parse_every_sample(world):
    mixture_module = pytest.importorskip("blip3.data.mixture")
    readers = pytest.importorskip("blip3.data.readers")
    records = pytest.importorskip("blip3.data.records")
    manifest = json.loads((world / "manifest.json").read_text())
    assert set(manifest["mixtures"]) == {"stage0", "pretrain", "tags", "sft", "multi_image_sft", "dpo", "safety"}
    parsed = Counter()
    for stage, relative in manifest["mixtures"].items():
        config = yaml.safe_load((world / relative).read_text())
        assert config["stage"] == stage
        for key in ("sources", "validation"):
            if key not in config:
                continue
            mixture = mixture_module.Mixture.from_dict(config[key], base_dir=world)
            for source in mixture.sources:
                for shard in readers.open_shards(source.type, source.path, source.image_root, {"shuffle": False}):
                    for _, row in shard.rows(seed=0, start=0):
                        assert not isinstance(row, records.BadSample), row
                        record = records.parse_record(row, source.format)
                        parsed[source.format] += 1
                        if source.format == "interleaved":
                            assert sum(not isinstance(s, str) for s in record.segments) >= 2
    assert set(parsed) == {"caption", "interleaved", "ocr", "grounding", "conversation", "preference"}


def test_the_tokenizer_has_the_xgenmm_layout_and_spells_strings_by_letter(world):
    tokenizer = load_world_tokenizer(world)
    vocab = tokenizer.get_vocab()
    image = vocab["<image>"]
    assert [vocab["<image placeholder>"], vocab["<|endofchunk|>"]] == [image + 1, image + 2]
    assert tokenizer.pad_token == "<pad>" and vocab["<pad>"] == image - 1 and len(tokenizer) == image + 3
    assert all(token in vocab for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"))
    assert tokenizer.tokenize("KMNA") == ["K", "M", "N", "A"]
    text = 'What colour is the circle?\nThe image shows a red star at the top left and the text "PLX".'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer.tokenize("Give the bounding box of the red circle.")) <= 9  # the world's words are pieces


@pytest.mark.parametrize("mode", ["anyres-patch", "anyres-fixed", "base"])
def test_the_tiny_config_matches_the_tokenizer_and_trains_on_world_samples(world, mode):
    tokenizer = load_world_tokenizer(world)
    config = tiny_world_config(tokenizer, vision_token_mode=mode)
    assert config.initial_tokenizer_len == tokenizer.convert_tokens_to_ids("<image>") == config.text_config.vocab_size
    assert config.vocab_size == len(tokenizer)
    assert config.stop_token_ids == tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    processor = Blip3Processor.from_config(config, tokenizer)  # raises if the special ids disagree
    torch.manual_seed(0)
    model = Blip3ForConditionalGeneration(config)
    # the LM starts from N(0, text_init_std), not transformers' 0.02 (docs/demo-findings.md)
    lm = model.model.language_model
    for weight in (lm.get_input_embeddings().weight, lm.layers[0].self_attn.qkv_proj.weight, model.lm_head.weight):
        assert weight.std().item() == pytest.approx(0.06, rel=0.05)
    single, multi = load_json(world, "sft/single.json")[0], load_json(world, "sft/multi.json")[0]
    images = [
        [Image.open(world / "images" / single["image"])],
        [Image.open(world / "images" / p) for p in multi["image"]],
    ]
    batch = processor.process_conversations([single["conversations"], multi["conversations"]], images)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and 4 < loss.item() < 9  # about ln(vocabulary) before training
    loss.backward()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is None  # frozen
    assert model.model.token_sampler.latents.grad is not None


def test_a_larger_test_split_is_drawn_as_the_worlds_own(world, tmp_path):
    from blip3.evaluation import load_synthetic

    manifest = write_test_split(world, tmp_path / "larger", per_task=2 * SIZES.test_per_task)
    counts = manifest["counts"]["test"]
    assert {task: counts[task] for task in tasks.SINGLE_IMAGE_TASKS + tasks.MULTI_IMAGE_TASKS} == dict.fromkeys(
        tasks.SINGLE_IMAGE_TASKS + tasks.MULTI_IMAGE_TASKS, 2 * SIZES.test_per_task
    )
    # POPE and safety in proportion: twice the images per POPE category (two questions each), twice the requests
    assert counts["pope_random"] == 2 * 2 * SIZES.pope_test_per_category
    assert sum(n for task, n in counts.items() if task.startswith("safety_")) == 2 * SIZES.safety_test
    assert manifest["test_split_of"] == str(world.resolve()) and manifest["seed"] == 0
    # the same generator: it begins with the world's own questions, then draws more
    larger = load_json(tmp_path / "larger", "eval/test/single.json")
    own = load_json(world, "eval/test/single.json")
    assert larger[0]["conversations"] == own[0]["conversations"] and len(larger) == 2 * len(own)
    assert any(record["held_out"] for record in larger)  # the test split asks about held-out pairs
    for name in ("single", "multi", "pope", "safety"):
        items = load_synthetic(tmp_path / "larger" / "eval" / "test" / f"{name}.json")
        assert items and all(Path(image).is_file() for item in items for image in item.images)
    # nothing is overwritten: a second split into the same folder stops before writing
    before = (tmp_path / "larger" / "eval" / "test" / "single.json").read_bytes()
    with pytest.raises(FileExistsError, match="holds a test split already"):
        write_test_split(world, tmp_path / "larger", per_task=1)
    assert (tmp_path / "larger" / "eval" / "test" / "single.json").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        write_test_split(tmp_path / "larger" / "eval", tmp_path / "other", per_task=1)


def test_blip3_world_writes_a_test_split_and_refuses_settings_the_world_decides(world, tmp_path, capsys):
    from blip3.cli import main

    main(["world", str(tmp_path / "split"), "--test-split-of", str(world), "--per-task", "1"])
    assert "1 per task" in capsys.readouterr().out
    assert len(load_json(tmp_path / "split", "eval/test/single.json")) == len(tasks.SINGLE_IMAGE_TASKS)
    with pytest.raises(SystemExit, match="--seed: a test split is drawn with the seed"):
        main(["world", str(tmp_path / "other"), "--test-split-of", str(world), "--seed", "1"])
    with pytest.raises(SystemExit, match="holds a test split already"):
        main(["world", str(tmp_path / "split"), "--test-split-of", str(world)])
    with pytest.raises(SystemExit, match="per_task must be at least 1, got 0"):
        main(["world", str(tmp_path / "other"), "--test-split-of", str(world), "--per-task", "0"])
    with pytest.raises(SystemExit, match="--per-task sizes a test split"):
        main(["world", str(tmp_path / "other"), "--per-task", "5"])
    assert not (tmp_path / "other").exists()
