"""From one image's tile features to what the token sampler reads (REFERENCE §2.3, §2.4).

The vision tower encodes every tile to a g×g grid of feature cells. An any-res image holds the
global view (tile 0) and `rows × cols` sub-tiles that together cover a canvas of (rows·g) × (cols·g)
cells, part of which is black letterbox. Two ways to hand that to the sampler:

- `group_anyres_patches` (anyres-patch): one group of g·g cells per tile, letterbox cells masked.
- `merge_anyres_fixed` (anyres-fixed): the global view's cells followed by the canvas with the
  letterbox cropped off, resampled together once.
"""

from __future__ import annotations

import math

import torch

TILE_CODE_FREQUENCIES = 4
# [is the global view, is a tile, sin/cos of the centre's x and y at each frequency, 1/cols, 1/rows]
TILE_CODE_WIDTH = 2 + 4 * TILE_CODE_FREQUENCIES + 2


def letterbox_mask(image_size: tuple[int, int], grid: tuple[int, int], cells: int, device=None) -> torch.Tensor:
    """bool [rows·g, cols·g] over the feature canvas, False on cells of the black letterbox bars.

    The original's `unpad_image(..., keep_original_shape=True)`, float arithmetic included, so that
    rounding picks the same rows/columns.
    """
    width, height = image_size
    cols, rows = grid
    canvas_h, canvas_w = rows * cells, cols * cells
    keep = torch.ones(canvas_h, canvas_w, dtype=torch.bool, device=device)
    if width / height > canvas_w / canvas_h:  # relatively wider: bars above and below
        scale = canvas_w / width
        pad = (canvas_h - int(height * scale)) // 2
        keep[:pad] = False
        keep[canvas_h - pad :] = False
    else:  # relatively taller (or equal): bars left and right
        scale = canvas_h / height
        pad = (canvas_w - int(width * scale)) // 2
        keep[:, :pad] = False
        keep[:, canvas_w - pad :] = False
    return keep


def tiles_to_canvas(tiles: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """[rows·cols, g·g, d] row-major tiles -> [rows·g, cols·g, d] feature canvas."""
    cols, rows = grid
    d = tiles.shape[-1]
    return tiles.view(rows, cols, cells, cells, d).permute(0, 2, 1, 3, 4).reshape(rows * cells, cols * cells, d)


def canvas_to_tiles(canvas: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """Inverse of `tiles_to_canvas`, for any trailing dims: [rows·g, cols·g, *] -> [rows·cols, g·g, *]."""
    cols, rows = grid
    rest = canvas.shape[2:]
    return canvas.view(rows, cells, cols, cells, *rest).transpose(1, 2).reshape(rows * cols, cells * cells, *rest)


def group_anyres_patches(
    features: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], cells: int, stripe_regrouping: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """features [1 + rows·cols, g·g, d] -> (groups [1 + rows·cols, g·g, d], keep [1 + rows·cols, g·g] bool).

    Group 0 is the global view (fully valid). With `stripe_regrouping` the sub-tile groups are what the
    released models were trained on: the original rebuilt the feature canvas and re-split it by a plain
    reshape, so for grids two or more tiles wide each group is a horizontal stripe of g/cols feature
    rows spanning the whole canvas width, not a tile. Without it, each group is exactly one tile.
    """
    global_view, tiles = features[:1], features[1:]
    keep = letterbox_mask(image_size, grid, cells, device=features.device)  # [rows·g, cols·g]
    n_sub = tiles.shape[0]
    if stripe_regrouping:
        # consecutive blocks of g·g cells in row-major order over the whole canvas
        groups = tiles_to_canvas(tiles, grid, cells).reshape(n_sub, cells * cells, -1)
        group_keep = keep.reshape(n_sub, cells * cells)
    else:
        groups = tiles
        group_keep = canvas_to_tiles(keep, grid, cells)
    global_keep = group_keep.new_ones(1, cells * cells)
    return torch.cat([global_view, groups]), torch.cat([global_keep, group_keep])


def merge_anyres_fixed(
    features: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], cells: int
) -> torch.Tensor:
    """features [1 + rows·cols, g·g, d] -> one sequence [g·g + valid canvas cells, d] (REFERENCE §2.4).

    The global view's cells, then the sub-tile canvas with the letterbox rows/columns cropped off,
    row-major; the sampler resamples it once to a fixed number of tokens per image.
    """
    keep = letterbox_mask(image_size, grid, cells, device=features.device)
    canvas = tiles_to_canvas(features[1:], grid, cells)  # [rows·g, cols·g, d]
    cropped = canvas[keep.any(dim=1)][:, keep.any(dim=0)]  # bars are whole rows or whole columns
    return torch.cat([features[0], cropped.flatten(0, 1)])


def tile_position_codes(grid: tuple[int, int] | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1 + rows·cols, TILE_CODE_WIDTH]: where each view of an any-res image lies (row 0: the global view).

    A tile is described by its centre in the image (x and y in [0, 1], as sin/cos of π·k·x, k = 1…4) and
    its share of the width and height, so the code of "the left tile" is the same idea whatever the
    grid; the global view has a code of its own. `grid` None: the global view alone (base mode, or
    anyres-fixed's single resampled group). Used only with `Blip3SamplerConfig.tile_position_code`.
    """
    rows_of_codes = [[1.0, 0.0] + [0.0] * (4 * TILE_CODE_FREQUENCIES) + [1.0, 1.0]]
    cols, rows = grid or (0, 0)
    for index in range(cols * rows):  # row-major, like the tiles
        centre_x, centre_y = (index % cols + 0.5) / cols, (index // cols + 0.5) / rows
        code = [0.0, 1.0]
        for centre in (centre_x, centre_y):
            for k in range(1, TILE_CODE_FREQUENCIES + 1):
                code += [math.sin(math.pi * k * centre), math.cos(math.pi * k * centre)]
        rows_of_codes.append(code + [1.0 / cols, 1.0 / rows])
    return torch.tensor(rows_of_codes, dtype=dtype, device=device)
