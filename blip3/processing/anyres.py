"""Any-resolution planning and tiling, exactly as the original xGen-MM pre-processing (REFERENCE §2.2).

An image of size (W, H) is placed on the best of a few candidate canvases (multiples of the vision
tower's base size), letterboxed in black, and cut into base-size tiles in row-major order. The
model sees the whole image squashed to one base-size "global view" first, then the tiles.

Sizes are always (width, height), as in PIL. Grids are (columns, rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The five canvases of the released xGen-MM v1.5 models, as (columns, rows) multiples of the base size.
# There is deliberately no 1×1 option: every image becomes a global view plus at least two tiles.
XGENMM_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

Size = tuple[int, int]


def select_best_grid(image_size: Size, grids: tuple[tuple[int, int], ...], base: int) -> tuple[int, int]:
    """The (columns, rows) grid whose canvas keeps the most of the image's pixels.

    Candidates are tried in order: largest effective resolution wins, then least wasted canvas,
    then the first in the list (this is why a square image picks 1×2 over 2×1).
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got (W, H) = {image_size}")
    best, best_effective, best_wasted = None, -1, math.inf
    for cols, rows in grids:
        canvas_w, canvas_h = cols * base, rows * base
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cols, rows), effective, wasted
    assert best is not None, "grids must not be empty"
    return best


def count_tiles(image_size: Size, mode: str, grids: tuple[tuple[int, int], ...], base: int) -> int:
    """Tiles an image is cut into: the global view plus one per grid cell, or the one view of `base` mode."""
    if mode == "base":
        return 1
    cols, rows = select_best_grid(image_size, grids, base)
    return 1 + cols * rows


def count_vision_tokens(
    image_size: Size, mode: str, grids: tuple[tuple[int, int], ...], base: int, num_latents: int
) -> int:
    """LM positions an image takes once its `<image>` is expanded.

    anyres-patch resamples every tile (global view included) to `num_latents` tokens; anyres-fixed and
    base resample the whole image once.
    """
    per_image = count_tiles(image_size, mode, grids, base) if mode == "anyres-patch" else 1
    return per_image * num_latents


@dataclass(frozen=True)
class AnyResPlan:
    """Where an image lands on its canvas, in pixels."""

    image_size: Size  # (W, H) of the raw image
    grid: tuple[int, int]  # (columns, rows) of base-size tiles
    base: int  # tile side in pixels
    resized: Size  # (W, H) of the image after resizing onto the canvas
    offset: tuple[int, int]  # (x, y) of its top-left corner on the black canvas

    @property
    def canvas(self) -> Size:
        return (self.grid[0] * self.base, self.grid[1] * self.base)

    @property
    def num_tiles(self) -> int:
        """Global view + one tile per grid cell."""
        return 1 + self.grid[0] * self.grid[1]


def plan_anyres(image_size: Size, grids: tuple[tuple[int, int], ...], base: int) -> AnyResPlan:
    """Choose the canvas and the letterbox placement (the original's int/ceil rounding included)."""
    width, height = image_size
    cols, rows = select_best_grid(image_size, grids, base)
    canvas_w, canvas_h = cols * base, rows * base
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), canvas_w), canvas_h
    offset = ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2)
    return AnyResPlan(image_size=(width, height), grid=(cols, rows), base=base, resized=(new_w, new_h), offset=offset)


def anyres_tiles(image: Image.Image, plan: AnyResPlan) -> np.ndarray:
    """uint8 tiles [1 + cols·rows, base, base, 3]: the squashed global view, then the row-major crops.

    Equivalent to the original's PIL paste + crop per tile, but cuts one numpy canvas instead.
    PIL's bicubic resize is kept: any other resizer gives different pixels.
    """
    return tiles_from_views(squashed_view(image, plan.base)[0], resized_view(image, plan), plan)


def resized_view(image: Image.Image, plan: AnyResPlan) -> np.ndarray:
    """uint8 [H', W', 3]: the image resized to `plan.resized`, before letterboxing."""
    return np.asarray(image.resize(plan.resized, Image.Resampling.BICUBIC))


def tiles_from_views(global_view: np.ndarray, resized: np.ndarray, plan: AnyResPlan) -> np.ndarray:
    """Letterbox `resized` (from `resized_view`) and cut it into tiles after `global_view`.

    The two resizes are separate functions so that a caller can run them in parallel threads
    (PIL releases the GIL while resampling); `anyres_tiles` is the one-call form.
    """
    base = plan.base
    cols, rows = plan.grid
    canvas = np.zeros((rows * base, cols * base, 3), dtype=np.uint8)  # black letterbox
    x, y = plan.offset
    new_w, new_h = plan.resized
    canvas[y : y + new_h, x : x + new_w] = resized
    tiles = np.empty((1 + rows * cols, base, base, 3), dtype=np.uint8)
    tiles[0] = global_view
    # [rows·base, cols·base, 3] -> [rows, cols, base, base, 3]: row-major tile order
    tiles[1:] = canvas.reshape(rows, base, cols, base, 3).swapaxes(1, 2).reshape(-1, base, base, 3)
    return tiles


def squashed_view(image: Image.Image, base: int) -> np.ndarray:
    """uint8 [1, base, base, 3]: the single squashed view of the `base` vision-token mode."""
    return np.asarray(image.resize((base, base), Image.Resampling.BICUBIC))[None]
