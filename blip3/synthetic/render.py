"""Drawing a `Scene` with PIL: anti-aliased shapes, text in Pillow's bundled font, the hazard marker.

Shapes and the hazard marker are drawn at `SUPERSAMPLE`× and box-filtered down (PIL's own shape
drawing is not anti-aliased); text is drawn afterwards at the final size, where FreeType's hinting
keeps 8-px letters crisp. Every shape fills the box the scene gives it, so a box is the shape's
tight extent (the grounding answers rely on it).
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from blip3.synthetic.world import COLOURS, TEXT_COLOUR, Box, Scene, font, text_ink_box

SUPERSAMPLE = 4
HAZARD_YELLOW = (250, 210, 0)
HAZARD_BLACK = (15, 15, 15)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size`."""
    width, height = scene.size
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_shape(draw, obj.kind, COLOURS[obj.colour], _scaled(obj.box))
    if scene.hazard is not None:
        draw_hazard(canvas, _scaled(scene.hazard.box))
    image = canvas.resize(scene.size, Image.Resampling.BOX)  # area average = anti-aliased edges

    draw = ImageDraw.Draw(image)
    for label in scene.texts:
        left, top, _, _ = text_ink_box(label.text, label.font_size)
        # The scene stores the ink's box; the drawing origin sits at (left, top) before it.
        draw.text((label.box[0] - left, label.box[1] - top), label.text, fill=TEXT_COLOUR, font=font(label.font_size))
    return image


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int], box: Box) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    elif kind == "star":
        draw.polygon(_fit([_star_point(k) for k in range(10)], box), fill=colour)
    elif kind == "cross":
        arm = 0.18 * (x2 - x1)  # half the bar's width
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.rectangle((cx - arm, y1, cx + arm, y2), fill=colour)
        draw.rectangle((x1, cy - arm, x2, cy + arm), fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def draw_hazard(canvas: Image.Image, box: Box) -> None:
    """A warning triangle filled with black and yellow diagonal stripes, with a black rim.

    Stripes make it unlike any plain shape (a yellow triangle included) at every scale the model sees.
    """
    x1, y1, x2, y2 = (round(v) for v in box)
    width, height = x2 - x1, y2 - y1
    stripes = Image.new("RGB", (width, height), HAZARD_YELLOW)
    stripe_draw = ImageDraw.Draw(stripes)
    band = max(2, width // 7)
    for start in range(-height, width, 2 * band):  # 45° bands
        stripe_draw.polygon(
            [(start, 0), (start + band, 0), (start + band + height, height), (start + height, height)],
            fill=HAZARD_BLACK,
        )
    outline = [(width / 2, 0), (width - 1, height - 1), (0, height - 1)]
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    canvas.paste(stripes, (x1, y1), mask)
    rim = max(2, width // 12)
    ImageDraw.Draw(canvas).line([(x1 + x, y1 + y) for x, y in [*outline, outline[0]]], fill=HAZARD_BLACK, width=rim)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes; a low zlib level because these images are tiny and written by the thousand."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _scaled(box: Box) -> Box:
    return tuple(v * SUPERSAMPLE for v in box)


def _star_point(k: int) -> tuple[float, float]:
    """The k-th vertex of a five-pointed star (outer and inner radii alternate), pointing up."""
    radius = 1.0 if k % 2 == 0 else 0.42
    angle = math.pi / 2 - k * math.pi / 5
    return radius * math.cos(angle), -radius * math.sin(angle)


def _fit(points: list[tuple[float, float]], box: Box) -> list[tuple[float, float]]:
    """Stretch `points` so that their extent is exactly `box`."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x1, y1, x2, y2 = box
    sx, sy = (x2 - x1) / (max(xs) - min(xs)), (y2 - y1) / (max(ys) - min(ys))
    return [(x1 + (x - min(xs)) * sx, y1 + (y - min(ys)) * sy) for x, y in points]
