"""The synthetic world's scene model: coloured shapes in a grid of cells, short strings of text, hazard markers.

A scene is a list of facts a question can be asked about, with every object's pixel box:

    Shape       kind (circle, square, …), colour, box, position ("top left", "middle", …)
    TextLabel   a string of 3–4 capital letters, "small" or "large", box, position
    hazard      a striped warning triangle (the safety data's cue), box, position

It is designed to be learnable by a tiny model in minutes: few colours and shapes (far apart in RGB
and in outline), at most one object of each colour × shape in a scene so that "the red circle" always
names one object, and one object per any-res tile, of nearly the same size everywhere:

- Sizes come in units of the vision tower's tile (`WorldSpec.tile_size`): an image is 2×2, 2×1, 1×2,
  3×1 or 1×3 tiles, so the any-res grids vary and every tile is cut from the image at its own
  resolution, with no resampling. The placement cells are those tiles. The token sampler resamples
  each tile on its own, so an object that straddled a tile edge would reach the LM only in pieces, in
  different tiles' tokens, and its colour could not be bound to its shape: with a 3×3 grid of cells
  over 2×2 tiles (an earlier version) the demo's SFT model answered shape questions at chance (13 %)
  and captions at CIDEr 123; with one object per tile, 30 % and 188. One object per tile also gives
  every object exactly one position word and a box nearly fixed by its tile.
- Objects fill 75–85 % of their tile: with the size free to vary by more, a tiny tower's pooled
  features confuse a small square with a large star (a linear probe on mean-pooled tile features
  reads the shape 91 % of the time at 75–85 %, 65 % at 60–85 %).
- Small text is sized to be legible in the tiles but not in the squashed global view (which halves
  the image at least), and lies wholly inside one tile; large text is legible in both views.

Everything is drawn from a `random.Random` the caller seeds, so a scene is a pure function of the seed.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

# Far apart in RGB so that a tiny vision tower separates them at a few pixels per object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
# Mildly skewed frequencies, so that POPE's "popular" negatives (the most frequent objects) mean something.
COLOUR_WEIGHTS = (0.22, 0.19, 0.17, 0.15, 0.14, 0.13)
SHAPE_WEIGHTS = (0.25, 0.22, 0.19, 0.18, 0.16)

# Capital letters that stay distinct at 8 px (no O/Q/D, I/J, B, S, G). No digits: the tokenizer merges
# digit runs (from box coordinates) into multi-digit pieces, and an OCR answer is easier to learn when
# every character is one token.
TEXT_ALPHABET = "ACEHKLMNPRTUXY"
# The strings the world writes: short words in that alphabet, as signs and labels are in real OCR data.
# No two are anagrams of each other, so a word can be told from the letters it holds alone; random
# letters would need their reading order, which a tile's few pooled tokens keep poorly.
TEXT_WORDS = tuple(
    "CAT HAT MAP NET PEN RAY TAX YAK ELK HEN HUT LAP NUT RUN CUP AXE EMU KEY ACE ARC YEN HUE "
    "LAKE HELP PARK CLAY MARK TUNA NEXT PALE RANK CAKE HAUL CULT KELP MYTH LYNX PLAY TRAY NAME LUCK".split()
)
TEXT_COLOUR = (20, 20, 20)
TEXT_SIZES = ("small", "large")

# Position words by (row third, column third) of the object's centre.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "middle",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}

Pair = tuple[str, str]  # (colour, shape kind)
Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels, (x1, y1) top-left


@dataclass(frozen=True)
class WorldSpec:
    """The world's parameters: image geometry, text sizes, how often things appear, held-out pairs.

    tile_size: the vision tower's input side; images are whole multiples of it.
    layouts: image shapes in tiles as (columns, rows), with their weights; every tile is a placement cell,
        so an image holds as many objects (+ text, hazard) as it has tiles.
    object_extent: an object's side as a fraction of its tile's, drawn uniformly in this range.
    words: the strings text labels are drawn from (two or more letters of `TEXT_ALPHABET` each).
    small_text_scale, large_text_scale: font size as a fraction of `tile_size` (≈ 10 and 20 px at 56).
    held_out_pairs: colour × shape pairs that training and validation questions never ask or answer
        about; the test split asks about them (pre-training captions still show them, as web data would).
    """

    tile_size: int = 56
    layouts: tuple[tuple[tuple[int, int], float], ...] = (
        ((2, 2), 0.5),
        ((2, 1), 0.125),
        ((1, 2), 0.125),
        ((3, 1), 0.125),
        ((1, 3), 0.125),
    )
    object_extent: tuple[float, float] = (0.75, 0.85)
    words: tuple[str, ...] = TEXT_WORDS
    small_text_scale: float = 0.18
    large_text_scale: float = 0.36
    min_objects: int = 1
    max_objects: int = 4
    held_out_pairs: tuple[Pair, ...] = (
        ("red", "star"),
        ("green", "triangle"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
    )

    def __post_init__(self):
        for colour, kind in self.held_out_pairs:
            if colour not in COLOURS or kind not in SHAPES:
                raise ValueError(f"held-out pair ({colour}, {kind}) is not a colour × shape of this world")
        for word in self.words:
            if len(word) < 2 or not set(word) <= set(TEXT_ALPHABET):
                raise ValueError(f"text word {word!r} must be two or more letters of {TEXT_ALPHABET!r}")
        if not 1 <= self.min_objects <= self.max_objects <= self.max_cells:
            raise ValueError(
                f"object counts must satisfy 1 <= min_objects <= max_objects <= {self.max_cells} (the most tiles of a layout)"
            )

    @property
    def max_cells(self) -> int:
        """The most tiles (placement cells) of any layout."""
        return max(cols * rows for (cols, rows), _ in self.layouts)

    def font_size(self, text_size: str) -> int:
        scale = self.small_text_scale if text_size == "small" else self.large_text_scale
        return max(6, round(scale * self.tile_size))

    def is_held_out(self, pair: Pair) -> bool:
        return tuple(pair) in self.held_out_pairs

    @classmethod
    def from_dict(cls, values: dict) -> WorldSpec:
        """The spec a world's manifest.json records (`dataclasses.asdict`, lists where the spec has tuples)."""

        def tuples(value):
            return tuple(tuples(item) for item in value) if isinstance(value, list) else value

        return cls(**{name: tuples(value) for name, value in values.items()})


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: Box
    position: str

    @property
    def pair(self) -> Pair:
        return (self.colour, self.kind)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class TextLabel:
    text: str
    size: str  # "small" | "large"
    font_size: int
    box: Box  # the ink's tight box
    position: str


@dataclass(frozen=True)
class Hazard:
    box: Box
    position: str


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]  # (W, H), whole tiles
    tile_size: int
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]
    texts: tuple[TextLabel, ...] = ()
    hazard: Hazard | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(columns, rows) of tiles, which are the placement cells."""
        return cell_grid(self.size, self.tile_size)

    def cells(self) -> list[Box]:
        """The placement cells' pixel boxes (the tiles), row by row."""
        cells = _Cells.of(self.size, self.tile_size)
        return [cells.bounds(cell) for cell in cells.free]

    @property
    def pairs(self) -> set[Pair]:
        return {obj.pair for obj in self.objects}

    def normalized(self, box: Box, digits: int = 3) -> list[float]:
        """A pixel box as [x1, y1, x2, y2] fractions of the image's width and height."""
        width, height = self.size
        x1, y1, x2, y2 = box
        return [
            round(x1 / width, digits),
            round(y1 / height, digits),
            round(x2 / width, digits),
            round(y2 / height, digits),
        ]

    def to_dict(self) -> dict:
        """JSON-ready description (pixel boxes and normalized ones), stored beside each image."""
        return {
            "size": list(self.size),
            "background": list(self.background),
            "objects": [
                {"kind": o.kind, "colour": o.colour, "position": o.position, "box": self.normalized(o.box)}
                for o in self.objects
            ],
            "texts": [
                {"text": t.text, "size": t.size, "position": t.position, "box": self.normalized(t.box)}
                for t in self.texts
            ],
            "hazard": None
            if self.hazard is None
            else {"position": self.hazard.position, "box": self.normalized(self.hazard.box)},
        }


# ---------------------------------------------------------------------------------------------------
# Geometry


def cell_grid(size: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """(columns, rows) of placement cells: the image's tiles.

    The centres of the tiles of every layout (2×2, 2×1, 1×2, 3×1, 1×3) fall in distinct thirds of the
    image, so the position word of an object placed near its tile's centre is the tile's.
    """
    width, height = size
    if width % tile_size or height % tile_size:
        raise ValueError(f"image size {size} is not a whole number of {tile_size}-px tiles")
    return width // tile_size, height // tile_size


def position_of(box: Box, size: tuple[int, int]) -> str:
    """The position word of a box's centre: which third of the image, across and down."""
    width, height = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(2, int(3 * cx / width))
    row = min(2, int(3 * cy / height))
    return POSITIONS[(row, col)]


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """The font bundled with Pillow (Aileron), at `size` px: nothing to download."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=8192)
def text_ink_box(text: str, font_size: int) -> tuple[int, int, int, int]:
    """The visible ink's box (left, top, right, bottom) relative to the drawing origin of `text`.

    Measured on the rendered glyphs (pixels at least a quarter covered), not from the font's metrics,
    which include side bearings and faint anti-aliased edges: an OCR box should be what one sees.
    """
    face = font(font_size)
    pad = 2
    _, _, right, bottom = face.getbbox(text)
    canvas = Image.new("L", (right + 2 * pad, bottom + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad, pad), text, fill=255, font=face)
    x1, y1, x2, y2 = canvas.point(lambda v: 255 if v >= 64 else 0).getbbox()
    return (x1 - pad, y1 - pad, x2 - pad, y2 - pad)


# ---------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class _Cells:
    """The free cells of an image's placement grid."""

    size: tuple[int, int]
    grid: tuple[int, int]
    free: list[tuple[int, int]] = field(default_factory=list)  # (col, row)

    @classmethod
    def of(cls, size: tuple[int, int], tile_size: int) -> _Cells:
        cols, rows = cell_grid(size, tile_size)
        return cls(size, (cols, rows), [(c, r) for r in range(rows) for c in range(cols)])

    def bounds(self, cell: tuple[int, int]) -> Box:
        (col, row), (cols, rows) = cell, self.grid
        cell_w, cell_h = self.size[0] / cols, self.size[1] / rows
        return (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)


def object_vocabulary() -> dict[str, str]:
    """Every way a caption names one of the world's objects, for CHAIR: {"red circle": "red circle",
    "red circles": "red circle", ...}. A shape word alone ("the circle") names no object: it may be any colour."""
    return {
        f"{colour} {form}": f"{colour} {kind}"
        for colour in COLOURS
        for kind in SHAPES
        for form in (kind, PLURALS[kind])
    }


def sample_colour_shape(rng: random.Random, exclude: Collection[Pair]) -> Pair:
    """A (colour, shape) pair by the world's frequencies, outside `exclude`."""
    for _ in range(1000):
        pair = (rng.choices(list(COLOURS), COLOUR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0])
        if pair not in exclude:
            return pair
    raise ValueError("no colour × shape pair is left to choose")


def sample_text(rng: random.Random, spec: WorldSpec) -> str:
    return rng.choice(spec.words)


def sample_layout(rng: random.Random, spec: WorldSpec, min_cells: int = 1) -> tuple[int, int]:
    """A layout by the spec's weights, among those with at least `min_cells` tiles."""
    fitting = [(layout, weight) for layout, weight in spec.layouts if layout[0] * layout[1] >= min_cells]
    if not fitting:
        raise ValueError(f"no layout of the world has {min_cells} tiles for the scene's objects")
    layouts, weights = zip(*fitting)
    return rng.choices(layouts, weights)[0]


def sample_scene(
    rng: random.Random,
    spec: WorldSpec,
    *,
    num_objects: int | None = None,
    text: str | None = None,
    num_texts: int = 1,
    hazard: bool = False,
    layout: tuple[int, int] | None = None,
    required: Sequence[Pair] = (),
    forbidden: Collection[Pair] = (),
) -> Scene:
    """A random scene.

    num_objects: shapes to place (default: uniform in [min_objects, max_objects], as many as the
        layout's tiles allow beside the hazard and one string of text); `required` pairs come first and
        count toward it. The layout is drawn among those with enough tiles for the shapes, the hazard
        and one string. Where text finds no free cells, it is dropped, so the count a caller asked for
        (counting questions rely on it) holds.
    text: None for no text, else "small", "large" or "mixed" (each string's size drawn at random).
    forbidden: pairs no shape may take (unless required), e.g. the one a "which image" question seeks.
    """
    fewest = max(spec.min_objects if num_objects is None else num_objects, len(required))
    text_cell = 1 if text and fewest + hazard < spec.max_cells else 0  # room for one string if it can be had
    cols_u, rows_u = layout or sample_layout(rng, spec, min_cells=fewest + hazard + text_cell)
    size = (cols_u * spec.tile_size, rows_u * spec.tile_size)
    if num_objects is None:
        most = min(spec.max_objects, cols_u * rows_u - hazard - text_cell)
        num_objects = rng.randint(fewest, max(most, fewest))
    num_objects = max(num_objects, len(required))
    cells = _Cells.of(size, spec.tile_size)
    if num_objects + hazard > len(cells.free):
        raise ValueError(f"{num_objects} shapes (+ hazard) do not fit the {cells.grid} cells of a {size} image")
    rng.shuffle(cells.free)

    texts = []
    for _ in range(num_texts if text else 0):
        text_size = rng.choice(TEXT_SIZES) if text == "mixed" else text
        label = _place_text(rng, spec, cells, text_size, keep_free=num_objects + hazard)
        if label is not None:
            texts.append(label)

    hazard_marker = None
    if hazard:
        bounds = cells.bounds(cells.free.pop())
        hazard_box = _box_in_cell(rng, bounds, extent=(0.85, 0.95))
        hazard_marker = Hazard(hazard_box, position_of(hazard_box, size))

    pairs = list(required)
    taken = set(pairs) | set(forbidden)
    while len(pairs) < num_objects:
        pair = sample_colour_shape(rng, exclude=taken)
        pairs.append(pair)
        taken.add(pair)
    rng.shuffle(pairs)
    objects = []
    for colour, kind in pairs:
        box = _box_in_cell(rng, cells.bounds(cells.free.pop()), extent=spec.object_extent)
        objects.append(Shape(kind, colour, box, position_of(box, size)))

    shade = rng.randint(236, 252)  # a light, slightly varying background
    return Scene(size, spec.tile_size, (shade, shade, shade), tuple(objects), tuple(texts), hazard_marker)


def _box_in_cell(rng: random.Random, cell: Box, extent: tuple[float, float]) -> Box:
    """A square box of side `extent` × the cell's shorter side, near the cell's centre, inside the cell."""
    x1, y1, x2, y2 = cell
    cell_w, cell_h = x2 - x1, y2 - y1
    side = rng.uniform(*extent) * min(cell_w, cell_h)
    # Jitter of up to 8% of the cell keeps the centre inside the cell's third of the image.
    cx = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * cell_w
    cy = (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * cell_h
    cx = min(max(cx, x1 + side / 2), x2 - side / 2)
    cy = min(max(cy, y1 + side / 2), y2 - side / 2)
    return (round(cx - side / 2, 2), round(cy - side / 2, 2), round(cx + side / 2, 2), round(cy + side / 2, 2))


def _place_text(rng: random.Random, spec: WorldSpec, cells: _Cells, text_size: str, keep_free: int) -> TextLabel | None:
    """Put a string where it covers only free cells and leaves `keep_free` of them; None if it finds no room.

    Small text lies wholly inside one any-res tile: a string cut by a tile edge could be read in no
    tile (each tile is resampled on its own). Large text spans a row of cells, centred on a column; it
    is meant to be read in the global view.
    """
    font_size = spec.font_size(text_size)
    width, height = cells.size
    room = spec.tile_size if text_size == "small" else width
    margin = 2
    for _ in range(20):  # wide letters can overflow the room: draw another string
        string = sample_text(rng, spec)
        left, top, right, bottom = text_ink_box(string, font_size)
        ink_w, ink_h = right - left, bottom - top
        if ink_w + 2 * margin <= room:
            break
    else:
        return None
    cols, rows = cells.grid
    every_cell = [(c, r) for r in range(rows) for c in range(cols)]
    for _ in range(20):
        if text_size == "small":
            tile = spec.tile_size
            tile_x = rng.randrange(width // tile) * tile
            tile_y = rng.randrange(height // tile) * tile
            x1 = rng.randint(tile_x + margin, tile_x + tile - margin - ink_w)
            y1 = rng.randint(tile_y + margin, tile_y + tile - margin - ink_h)
        else:
            cell = cells.bounds((rng.randrange(cols), rng.randrange(rows)))
            cx = min(max((cell[0] + cell[2]) / 2, margin + ink_w / 2), width - margin - ink_w / 2)
            x1, y1 = round(cx - ink_w / 2), round((cell[1] + cell[3]) / 2 - ink_h / 2)
        # Integer ink position: text is drawn on the pixel grid, so its box is exact.
        box = (float(x1), float(y1), float(x1 + ink_w), float(y1 + ink_h))
        covered = [c for c in every_cell if _overlaps(cells.bounds(c), box, margin)]
        if any(c not in cells.free for c in covered) or len(cells.free) - len(covered) < keep_free:
            continue
        for c in covered:
            cells.free.remove(c)
        return TextLabel(string, text_size, font_size, box, position_of(box, cells.size))
    return None


def _overlaps(a: Box, b: Box, margin: float) -> bool:
    return a[0] < b[2] + margin and b[0] - margin < a[2] and a[1] < b[3] + margin and b[1] - margin < a[3]
