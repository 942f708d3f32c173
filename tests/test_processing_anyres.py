"""Any-res planning and tiling (REFERENCE §2.2): the worked examples and properties of every plan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from blip3.processing.anyres import XGENMM_GRIDS, anyres_tiles, plan_anyres, resized_view

# (W, H) -> (columns, rows) at base 384, from REFERENCE §2.2 and §10.
WORKED_EXAMPLES = {
    (300, 300): (1, 2),
    (384, 384): (1, 2),
    (385, 385): (2, 2),
    (640, 480): (2, 2),
    (1024, 768): (2, 2),
    (1920, 1080): (2, 2),
    (1000, 1000): (2, 2),
    (800, 400): (2, 1),
    (400, 800): (1, 2),
    (1200, 300): (3, 1),
    (2000, 500): (3, 1),
    (300, 1200): (1, 3),
    (500, 2000): (1, 3),
}

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@pytest.mark.parametrize("size, grid", WORKED_EXAMPLES.items(), ids=[f"{w}x{h}" for w, h in WORKED_EXAMPLES])
def test_worked_examples(size, grid):
    plan = plan_anyres(size, XGENMM_GRIDS, 384)
    assert plan.grid == grid
    assert plan.num_tiles == 1 + grid[0] * grid[1]


def test_letterbox_of_worked_examples():
    # a small square is upscaled to 384×384 with 192-px bars above and below
    assert plan_anyres((300, 300), XGENMM_GRIDS, 384).resized == (384, 384)
    assert plan_anyres((300, 300), XGENMM_GRIDS, 384).offset == (0, 192)
    # 1920×1080 becomes 768×432 with 168-px bars
    assert plan_anyres((1920, 1080), XGENMM_GRIDS, 384).resized == (768, 432)
    assert plan_anyres((1920, 1080), XGENMM_GRIDS, 384).offset == (0, 168)


@given(size=sizes, base=st.sampled_from([28, 112, 384]))
@settings(max_examples=300, deadline=None)
def test_plan_properties(size, base):
    plan = plan_anyres(size, XGENMM_GRIDS, base)
    (canvas_w, canvas_h), (new_w, new_h), (x, y) = plan.canvas, plan.resized, plan.offset
    assert 3 <= plan.num_tiles <= 5  # global view + 2 to 4 tiles: there is no 1×1 grid
    assert plan.grid in XGENMM_GRIDS
    # the resized image fits the canvas and fills it along one side
    assert 1 <= new_w <= canvas_w and 1 <= new_h <= canvas_h
    assert new_w == canvas_w or new_h == canvas_h
    # centred letterbox
    assert (x, y) == ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2)
    # aspect ratio kept up to the rounding of the shorter side (ceil, capped at the canvas)
    width, height = size
    if new_w == canvas_w:
        assert abs(new_h - height * canvas_w / width) <= 1 or new_h == canvas_h
    else:
        assert abs(new_w - width * canvas_h / height) <= 1 or new_w == canvas_w


@given(size=st.tuples(st.integers(1, 300), st.integers(1, 300)), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_tiles_reassemble_to_the_letterboxed_canvas(size, seed):
    base = 28
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    plan = plan_anyres(size, XGENMM_GRIDS, base)
    tiles = anyres_tiles(image, plan)
    cols, rows = plan.grid
    assert tiles.shape == (plan.num_tiles, base, base, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[0], np.asarray(image.resize((base, base), Image.Resampling.BICUBIC)))
    canvas = tiles[1:].reshape(rows, cols, base, base, 3).swapaxes(1, 2).reshape(rows * base, cols * base, 3)
    (x, y), (new_w, new_h) = plan.offset, plan.resized
    np.testing.assert_array_equal(canvas[y : y + new_h, x : x + new_w], resized_view(image, plan))
    outside = np.ones(canvas.shape[:2], dtype=bool)
    outside[y : y + new_h, x : x + new_w] = False
    assert not canvas[outside].any()  # black letterbox


def test_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive"):
        plan_anyres((0, 10), XGENMM_GRIDS, 384)
