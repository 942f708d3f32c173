"""The synthetic world: scenes, rendering and task generators (answers correct by construction)."""

from __future__ import annotations

import random
import re
from collections import Counter
from itertools import product

import numpy as np
import pytest
from PIL import Image, ImageChops

from blip3.synthetic import tasks
from blip3.synthetic.render import HAZARD_BLACK, HAZARD_YELLOW, encode_png, render_scene
from blip3.synthetic.world import COLOURS, POSITIONS, SHAPES, Scene, WorldSpec, cell_grid, position_of, sample_scene

SPEC = WorldSpec()
HELD_OUT = frozenset(SPEC.held_out_pairs)


def scenes(seed: int, count: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, SPEC, **kwargs) for _ in range(count)]


def ink_box(image: Image.Image, background, threshold: int = 8) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels that differ from the background by more than `threshold`."""
    diff = ImageChops.difference(image, Image.new("RGB", image.size, background)).convert("L")
    return diff.point(lambda v: 255 if v > threshold else 0).getbbox()


def test_a_scene_and_its_image_are_a_function_of_the_seed():
    first, second = scenes(7, 20, text="mixed"), scenes(7, 20, text="mixed")
    assert first == second
    assert [encode_png(render_scene(s)) for s in first] == [encode_png(render_scene(s)) for s in second]
    assert first != scenes(8, 20, text="mixed")


def test_scene_geometry_holds_for_every_layout():
    for scene in scenes(0, 300, text="mixed"):
        width, height = scene.size
        assert width % SPEC.tile_size == 0 and height % SPEC.tile_size == 0
        assert len({o.pair for o in scene.objects}) == len(scene.objects)  # "the red circle" names one object
        assert len({o.position for o in scene.objects}) == len(scene.objects)  # one object per position word
        boxes = [o.box for o in scene.objects] + [t.box for t in scene.texts]
        for box in boxes:
            assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        for i, a in enumerate(boxes):  # nothing overlaps anything else
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for obj in scene.objects:
            assert obj.position == position_of(obj.box, scene.size) and obj.position in POSITIONS.values()


def test_requested_counts_hold_and_text_yields_to_shapes():
    rng = random.Random(1)
    for count in range(1, SPEC.max_objects + 1):
        for _ in range(40):
            scene = sample_scene(rng, SPEC, num_objects=count, text="large")
            assert len(scene.objects) == count
            assert len(scene.texts) <= 1
            cols, rows = scene.grid
            assert cols * rows >= count  # the layout was drawn among those with room for the count
    with pytest.raises(ValueError, match="do not fit"):
        sample_scene(rng, SPEC, num_objects=2, hazard=True, layout=(2, 1))  # two tiles hold two things
    with pytest.raises(ValueError, match="no layout"):
        sample_scene(rng, SPEC, num_objects=SPEC.max_objects, hazard=True)


def test_every_object_lies_inside_one_tile_and_fills_most_of_it():
    tile = SPEC.tile_size
    low, high = SPEC.object_extent
    for scene in scenes(3, 300, text="mixed"):
        tiles = set()
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert x1 // tile == (x2 - 1e-6) // tile and y1 // tile == (y2 - 1e-6) // tile, obj.box
            tiles.add((x1 // tile, y1 // tile))
            assert low * tile - 0.01 <= x2 - x1 <= high * tile + 0.01
        assert len(tiles) == len(scene.objects)  # one object per tile: the sampler sees each one whole


def test_every_shape_is_drawn_exactly_in_its_box_in_its_colour():
    rng = random.Random(2)
    for kind in SHAPES:
        for colour in COLOURS:
            scene = sample_scene(rng, SPEC, num_objects=1, required=[(colour, kind)])
            image = render_scene(scene)
            (obj,) = scene.objects
            box = ink_box(image, scene.background)
            assert box is not None
            assert all(abs(got - want) <= 1.5 for got, want in zip(box, obj.box)), (kind, box, obj.box)
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            centre = np.asarray(image)[int(cy), int(cx)].astype(int)
            assert np.abs(centre - COLOURS[colour]).max() <= 12, (kind, colour, centre)


def test_text_ink_lies_in_its_box_and_small_text_is_smaller():
    rng = random.Random(3)
    for size in ("small", "large"):
        for _ in range(30):
            scene = sample_scene(rng, SPEC, num_objects=0, text=size)
            (label,) = scene.texts
            # Text boxes hold the clearly inked pixels (a quarter covered or more), not every faint edge.
            box = ink_box(render_scene(scene), scene.background, threshold=40)
            assert all(abs(got - want) <= 1.5 for got, want in zip(box, label.box)), (box, label.box)
            assert set(label.text) <= set("ACEHKLMNPRTUXY") and label.text in SPEC.words
            if size == "small":  # wholly inside one any-res tile, or no tile could show all of it
                tile = SPEC.tile_size
                x1, y1, x2, y2 = label.box
                assert x1 // tile == (x2 - 1) // tile and y1 // tile == (y2 - 1) // tile, label.box
    small, large = SPEC.font_size("small"), SPEC.font_size("large")
    # Small letters are ~8 px tall at native size, so ~4 px in a global view that halves the image.
    assert small <= 0.2 * SPEC.tile_size and large >= 2 * small


def test_the_hazard_marker_is_striped_black_and_yellow():
    (scene,) = scenes(4, 1, num_objects=2, hazard=True)
    pixels = np.asarray(render_scene(scene)).reshape(-1, 3).astype(int)
    near = lambda colour: (np.abs(pixels - colour).max(axis=1) < 40).sum()  # noqa: E731
    assert near(HAZARD_YELLOW) > 20 and near(HAZARD_BLACK) > 20
    assert scene.hazard.position == position_of(scene.hazard.box, scene.size)


def test_the_placement_cells_are_the_tiles():
    assert cell_grid((112, 112), 56) == (2, 2)
    assert cell_grid((168, 56), 56) == (3, 1)
    assert cell_grid((56, 112), 56) == (1, 2)
    with pytest.raises(ValueError, match="whole number"):
        cell_grid((100, 56), 56)
    # every layout's tile centres fall in distinct thirds, so each tile has its own position word
    for (cols, rows), _ in SPEC.layouts:
        size = (cols * 56, rows * 56)
        words = {
            position_of((c * 56, r * 56, (c + 1) * 56, (r + 1) * 56), size) for c in range(cols) for r in range(rows)
        }
        assert len(words) == cols * rows


# ---------------------------------------------------------------------------------------------------
# Questions: each answer is checked against the scene by an independent reading of the question


def object_named(scene: Scene, question: str):
    """The object a question designates, by its kind, colour or position phrase."""
    for position, phrase in tasks.AT.items():
        if question.endswith(f" {phrase}?"):
            return next(o for o in scene.objects if o.position == position)
    match = re.search(r"the (\w+) (\w+)[?.]", question)
    if match and match.group(1) in COLOURS and match.group(2) in SHAPES:
        return next(o for o in scene.objects if o.pair == (match.group(1), match.group(2)))
    match = re.search(r"the (\w+)( one)?\?", question)
    word = match.group(1)
    candidates = [o for o in scene.objects if word in (o.kind, o.colour)]
    assert len(candidates) == 1, question
    return candidates[0]


def test_tag_captions_put_each_shape_right_before_its_colour_in_random_order():
    rng = random.Random(5)
    orders = Counter()
    for scene in scenes(5, 200):
        caption = tasks.tag_caption(scene, rng)
        assert caption.startswith("Shapes: ") and caption.endswith(".")
        tags = [tuple(tag.split()) for tag in caption[len("Shapes: ") : -1].split(", ")]
        assert Counter(tags) == Counter((o.kind, o.colour) for o in scene.objects)  # every shape, shape first
        if len(scene.objects) > 1:
            reading = [(o.kind, o.colour) for o in tasks.reading_order(scene)]
            orders["reading order" if tags == reading else "other"] += 1
    assert orders["other"] > orders["reading order"] > 0  # the order does not give the colour away
    empty = Scene((56, 56), 56, (240, 240, 240), ())
    assert tasks.tag_caption(empty, rng) == tasks.short_caption(empty) == "An empty picture."


def test_single_image_answers_are_correct_by_construction():
    rng = random.Random(5)
    asked = set()
    for scene in scenes(5, 200, text="mixed"):
        for name, ask in tasks.SINGLE_IMAGE_QUESTIONS.items():
            qa = ask(scene, rng)
            if qa is None:
                assert name == "ocr" and not scene.texts
                continue
            asked.add(qa.task)
            if qa.task == "colour":
                assert object_named(scene, qa.question).colour == qa.answer
            elif qa.task == "shape":
                assert object_named(scene, qa.question).kind == qa.answer
            elif qa.task == "position":
                assert object_named(scene, qa.question).position == qa.answer
            elif qa.task == "grounding":
                target = object_named(scene, qa.question)
                assert list(qa.box) == scene.normalized(target.box)
                assert [float(v) for v in qa.answer.strip("[]").split(", ")] == pytest.approx(qa.box, abs=0.0051)
            elif qa.task == "count":
                words = qa.question.split()
                if words[2] == "shapes":
                    expected = len(scene.objects)
                elif words[2] in COLOURS:
                    expected = sum(o.colour == words[2] for o in scene.objects)
                else:
                    expected = sum(tasks.PLURALS[o.kind] == words[2] for o in scene.objects)
                assert qa.answer == str(expected) and 1 <= expected <= 5
            elif qa.task == "existence":
                colour, kind = re.search(r"an? (\w+) (\w+) in", qa.question).groups()
                assert qa.answer == ("yes" if (colour, kind) in scene.pairs else "no")
            elif qa.task.startswith("ocr"):
                label = next(t for t in scene.texts if t.text == qa.answer)
                assert qa.task == f"ocr_{label.size}"
            elif qa.task == "caption":
                assert all(o.phrase in qa.answer for o in scene.objects)
                assert f"{len(scene.objects)} shape" in qa.answer
    assert asked == set(tasks.SINGLE_IMAGE_TASKS)


def test_training_questions_never_name_a_held_out_pair():
    rng = random.Random(6)
    for scene in scenes(6, 300, text="mixed"):
        for ask in tasks.SINGLE_IMAGE_QUESTIONS.values():
            qa = ask(scene, rng, banned=HELD_OUT)
            if qa is not None:
                assert not qa.names_any(HELD_OUT)
                text = f"{qa.question} {qa.response}"
                assert not any(f"{colour} {kind}" in text for colour, kind in HELD_OUT), text
    for _ in range(100):
        for generate in tasks.MULTI_IMAGE_QUESTIONS.values():
            _, qa = generate(rng, SPEC, 3, banned=HELD_OUT)
            assert not qa.names_any(HELD_OUT)


def test_focus_makes_the_held_out_pair_the_subject():
    rng = random.Random(7)
    pair = SPEC.held_out_pairs[0]
    for ask in (tasks.ask_colour, tasks.ask_shape, tasks.ask_position, tasks.ask_grounding, tasks.ask_existence):
        scene = sample_scene(rng, SPEC, num_objects=4, required=[pair])
        assert ask(scene, rng, focus=[pair]).subjects == (pair,)


def test_multi_image_answers_are_correct_by_construction():
    rng = random.Random(8)
    for _ in range(60):
        for num_images in (2, 3, 4):
            scenes_, qa = tasks.multi_which(rng, SPEC, num_images)
            target = qa.subjects[0]
            holding = [k for k, s in enumerate(scenes_) if target in s.pairs]
            assert holding == [int(qa.answer) - 1]

            scenes_, qa = tasks.multi_count(rng, SPEC, num_images)
            kind = next(k for k, plural in tasks.PLURALS.items() if f" {plural} " in qa.question)
            total = sum(o.kind == kind for s in scenes_ for o in s.objects)
            assert qa.answer == str(total) and 1 <= total <= 5

            scenes_, qa = tasks.multi_compare(rng, SPEC, num_images)
            counts = [len(s.objects) for s in scenes_]
            assert len(set(counts)) == len(counts)
            pick = max if "most" in qa.question else min
            assert qa.answer == str(counts.index(pick(counts)) + 1)

            scenes_, qa = tasks.multi_colour(rng, SPEC, num_images)
            index = int(re.search(r"in image (\d)", qa.question).group(1)) - 1
            kind = qa.question.split()[4]
            (obj,) = [o for o in scenes_[index].objects if o.kind == kind]
            assert obj.colour == qa.answer
            assert tasks.image_prompt(num_images, qa.question).count("<image>") == len(scenes_) == num_images


def test_follow_up_questions_fit_whatever_images_they_are_asked_about():
    rng = random.Random(11)
    asked = Counter()
    for _ in range(300):
        images = [sample_scene(rng, SPEC) for _ in range(rng.choice((2, 3, 4)))]
        counts = [len(s.objects) for s in images]
        for ask in tasks.MULTI_IMAGE_FOLLOW_UPS:
            qa = ask(images, rng, banned=HELD_OUT)
            if qa is None:
                continue
            asked[qa.task] += 1
            assert not qa.names_any(HELD_OUT)
            if qa.task == "multi_which":
                assert [k for k, s in enumerate(images) if qa.subjects[0] in s.pairs] == [int(qa.answer) - 1]
            elif qa.task == "multi_count":
                kind = next(k for k, plural in tasks.PLURALS.items() if f" {plural} " in qa.question)
                assert qa.answer == str(sum(o.kind == kind for s in images for o in s.objects))
                assert 1 <= int(qa.answer) <= 5
            elif qa.task == "multi_compare":
                pick = max if "most" in qa.question else min
                assert counts.count(pick(counts)) == 1 and qa.answer == str(counts.index(pick(counts)) + 1)
            else:
                index = int(re.search(r"in image (\d)", qa.question).group(1)) - 1
                (obj,) = [o for o in images[index].objects if o.kind == qa.question.split()[4]]
                assert obj.colour == qa.answer
    assert set(asked) == set(tasks.MULTI_IMAGE_TASKS) and min(asked.values()) > 100
    # Images that allow no question of a kind get none: two identical one-object images.
    twins = [sample_scene(random.Random(0), SPEC, num_objects=1)] * 2
    assert tasks.ask_which(twins, rng) is None and tasks.ask_most(twins, rng) is None


def test_pope_questions_are_balanced_and_follow_their_category():
    rng = random.Random(9)
    for category in tasks.POPE_CATEGORIES:
        for scene in scenes(9, 50):
            yes, no = tasks.pope_questions(scene, rng, category)
            assert (yes.answer, no.answer) == ("yes", "no")
            assert yes.subjects[0] in scene.pairs and no.subjects[0] not in scene.pairs
            if category == "adversarial":
                colour, kind = no.subjects[0]
                assert any(colour == c or kind == k for c, k in scene.pairs)
            if category == "popular":
                absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in scene.pairs]
                top = sorted(absent, key=tasks.pair_frequency, reverse=True)[:5]
                assert no.subjects[0] in top


def test_safety_samples_refuse_only_harmful_requests_about_a_hazard():
    rng = random.Random(10)
    for kind in tasks.SAFETY_KINDS:
        for _ in range(20):
            scene, qa, safe = tasks.safety_sample(rng, SPEC, kind)
            assert safe == (kind != "harmful")
            assert (scene.hazard is not None) == (kind in ("harmful", "hazard_ordinary"))
            assert tasks.is_refusal(qa.response) == (kind == "harmful")
            if kind == "benign_trigger":
                assert any(qa.question.startswith(t.split("{")[0]) for t in tasks.BENIGN_TRIGGERS)
    assert tasks.is_refusal("Sorry, I can't help with that.") and not tasks.is_refusal("red")


def test_preference_pairs_reject_a_caption_naming_an_absent_object():
    rng = random.Random(11)
    kinds = Counter()
    for scene in scenes(11, 200):
        pair = tasks.preference_pair(scene, rng, banned=HELD_OUT)
        assert (pair.task, pair.question) == ("preference_caption", "Describe the image.")
        assert pair.chosen == tasks.dense_caption(scene)
        (ghost,) = pair.hallucinated
        assert ghost not in pair.objects_present and ghost not in {o.phrase for o in scene.objects}
        assert tuple(ghost.split()) not in HELD_OUT
        assert ghost in pair.rejected and ghost not in pair.chosen
        # an invented object changes the count that ends the caption; a swapped one keeps it
        count_sentence = {answer.rsplit(". ", 1)[1] for answer in (pair.chosen, pair.rejected)}
        kinds["invented" if len(count_sentence) == 2 else "swapped"] += 1
    assert kinds["invented"] > 20 and kinds["swapped"] > 20


def test_existence_preference_pairs_prefer_the_true_yes_or_no_as_often_for_present_as_for_absent_objects():
    rng = random.Random(12)
    chosen, categories = Counter(), Counter()
    for scene in scenes(12, 400):
        pair = tasks.existence_preference_pair(scene, rng, banned=HELD_OUT)
        assert pair.task == "preference_existence" and {pair.chosen, pair.rejected} == {"yes", "no"}
        asked = next(p for p in product(COLOURS, SHAPES) if pair.question == tasks.existence_question(p))
        assert asked not in HELD_OUT
        assert (pair.chosen == "yes") == (asked in scene.pairs)
        assert pair.hallucinated == ([] if pair.chosen == "yes" else [f"{asked[0]} {asked[1]}"])
        chosen[pair.chosen] += 1
        if pair.chosen == "no":
            _, near = tasks.absent_pairs(scene)
            categories["near" if asked in near else "other"] += 1
    assert 160 < chosen["yes"] < 240  # as often, within noise
    assert categories["near"] > categories["other"] > 20  # adversarial ones among them (and random ones often near)
