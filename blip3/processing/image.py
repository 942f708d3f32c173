"""Images in, vision-tower pixels out.

`load_image` turns whatever a user, a data shard or an API request hands us (a PIL image, a path,
encoded bytes, a numpy array) into a plain RGB PIL image, or raises `ImageError` saying what is
wrong with it. `Blip3ImageProcessor` turns a list of such images into the tiles the vision tower
reads: for each image its any-res tiles (global view first) or its single squashed view, all
normalised in one vectorised pass and stacked into one `[ΣNp, 3, S, S]` tensor.

Pixels match the original xGen-MM pre-processing bit for bit (REFERENCE §2.2): PIL bicubic resizes
(`blip3.processing.anyres`) and torchvision's ToTensor + Normalize, i.e. `(x / 255 - mean) / std`
in float32.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers import BaseImageProcessor, BatchFeature

from blip3.config import VISION_TOKEN_MODES, Blip3Config
from blip3.processing.anyres import (
    XGENMM_GRIDS,
    Size,
    count_tiles,
    plan_anyres,
    resized_view,
    squashed_view,
    tiles_from_views,
)

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray

# 8192² pixels: more than any camera photo, and below the size at which PIL starts warning of
# decompression bombs (≈ 89.5 MP). Decoding costs memory before the pixels can be looked at, so the
# size is checked from the header first.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image; the message says which input and why."""


class ImageTooLargeError(ImageError):
    """An image refused for its size before its pixels were decoded (our limit, or PIL's bomb check)."""


# ---------------------------------------------------------------------------------------------------
# Loading


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, encoded bytes or a uint8 HWC/HW numpy array.

    The EXIF orientation is applied (so `.size` is the size as displayed), any mode becomes RGB, and
    images larger than `max_pixels` are refused before their pixels are decoded. Every failure is
    an `ImageError` naming the input and the problem. A PIL RGB input without EXIF rotation is
    returned as is (not copied).
    """
    name = _describe(source)
    image = _open(source, name)
    _check_size(image, max_pixels, name)
    try:
        image.load()
        image = _apply_exif_orientation(image)
    # Decoders of untrusted bytes fail in many ways (OSError, SyntaxError, struct.error, zlib.error, ...).
    except Exception as err:
        raise ImageError(f"{name} is truncated or corrupt: {err}") from err
    return _to_rgb(image, name)


def is_image_source(value: Any) -> bool:
    """Whether `value` is one image `load_image` accepts (rather than a list of them)."""
    return isinstance(value, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray))


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, np.ndarray):
        return f"image array (shape {source.shape}, {source.dtype})"
    return f"{type(source).__name__} image"


def _open(source: ImageSource, name: str) -> Image.Image:
    """A PIL image whose header has been read (pixels may still be undecoded)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, (str, os.PathLike)):
        # Read whole, so that no file handle outlives this call (PIL keeps multi-frame files open).
        try:
            source = Path(source).read_bytes()
        except OSError as err:
            raise ImageError(f"cannot read {name}: {err.strerror or err}") from err
    if not isinstance(source, (bytes, bytearray, memoryview)):
        raise ImageError(f"unsupported image input of type {type(source).__name__}")
    if len(source) == 0:
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(source))
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name} is too large: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name} is not in a recognised image format") from err
    except Exception as err:  # a header the format plugin recognised but could not parse
        raise ImageError(f"{name} is corrupt: {err}") from err


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 (H, W) or (H, W, 1|3|4)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"{name}: arrays must be uint8 (H, W) or (H, W, 1|3|4)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name} has zero size")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name} has zero size ({width}×{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name} is too large: {width}×{height} pixels exceeds the limit of {max_pixels}")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # Checked first because `exif_transpose` copies the image even when there is nothing to do.
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # "I;16*" (and "I", PIL's 32-bit container for them) hold 16-bit samples; PIL's own convert
        # would clip them at 255 instead of scaling, turning most images white.
        samples = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((samples * 255 + 32767) // 65535).astype(np.uint8)  # round(v · 255 / 65535)
        return Image.fromarray(grey).convert("RGB")
    if image.has_transparency_data:
        # Composite on black: transparent areas then look like the black letterbox around every image
        # (no content), and opaque images are unchanged. The original's plain `.convert("RGB")` instead
        # shows whatever colour happens to be stored under alpha 0.
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size)
        rgb.paste(rgba, mask=rgba)
        return rgb
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F, ...
    except ValueError as err:
        raise ImageError(f"{name} has an unsupported mode {image.mode!r}: {err}") from err


# ---------------------------------------------------------------------------------------------------
# Tiles and vision tokens


def _grid_tuple(grids: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(cols), int(rows)) for cols, rows in grids)


R = TypeVar("R")


def _run_parallel(jobs: Sequence[Callable[[], R]]) -> list[R]:
    """The jobs' results, in order, computed on a thread pool as wide as torch's thread budget.

    PIL releases the GIL while decoding and resampling, which is where nearly all the time goes.
    Following `torch.get_num_threads()` means DataLoader workers (which torch sets to one thread)
    run serially instead of oversubscribing the machine.
    """
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        return [job() for job in jobs]
    return list(_thread_pool(workers, os.getpid()).map(lambda job: job(), jobs))


@cache
def _thread_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # Keyed by process: a forked child inherits the pool object but not its threads, and would wait forever.
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blip3-image")


class Blip3ImageProcessor(BaseImageProcessor):
    r"""Any-res tiling and normalisation of xGen-MM (REFERENCE §2.2).

    image_size: side S of one tile in pixels (the vision tower's input size; 384 for the released models).
    anyres_grids: candidate canvases as (columns, rows) multiples of S, tried in order.
    vision_token_mode: `"anyres-patch"` or `"anyres-fixed"` (global view + row-major tiles of the
        letterboxed canvas), or `"base"` (one view, the image squashed to S×S).
    image_mean, image_std: per-channel normalisation of the [0, 1] pixels.
    max_image_pixels: larger images are refused with an `ImageError` before decoding.

    Calling it on a list of images gives a `BatchFeature` with
    `pixel_values` float32 [ΣNp, 3, S, S] (all tiles of all images, in order),
    `image_sizes` int64 [N, 2] as (W, H), and `num_tiles` int64 [N].
    """

    model_input_names = ["pixel_values", "image_sizes", "num_tiles"]

    def __init__(
        self,
        image_size: int = 384,
        anyres_grids: Sequence[Sequence[int]] = XGENMM_GRIDS,
        vision_token_mode: str = "anyres-patch",
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if vision_token_mode not in VISION_TOKEN_MODES:
            raise ValueError(f"vision_token_mode must be one of {VISION_TOKEN_MODES}, got {vision_token_mode!r}")
        if not anyres_grids:
            raise ValueError("anyres_grids must list at least one (columns, rows) grid")
        self.image_size = int(image_size)
        self.anyres_grids = [list(grid) for grid in _grid_tuple(anyres_grids)]  # lists: JSON round trip
        self.vision_token_mode = vision_token_mode
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.max_image_pixels = int(max_image_pixels)

    @classmethod
    def from_model_config(cls, config: Blip3Config) -> Blip3ImageProcessor:
        """The image processor a model of this `Blip3Config` was built for."""
        return cls(
            image_size=config.image_size,
            anyres_grids=config.anyres_grids,
            vision_token_mode=config.vision_token_mode,
            image_mean=config.image_mean,
            image_std=config.image_std,
        )

    def load(self, images: ImageSource | Sequence[ImageSource]) -> list[Image.Image]:
        """`load_image` on one image or each of a list, in parallel."""
        sources = [images] if is_image_source(images) else list(images)
        return _run_parallel([partial(load_image, source, self.max_image_pixels) for source in sources])

    def num_tiles(self, image_size: Size) -> int:
        """Tiles an image of (W, H) `image_size` is cut into (global view included)."""
        return count_tiles(image_size, self.vision_token_mode, _grid_tuple(self.anyres_grids), self.image_size)

    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> BatchFeature:
        images = self.load(images)
        tiles = self._tiles(images)  # uint8, one [Np, S, S, 3] array per image
        side = self.image_size
        pixel_values = np.empty((sum(len(t) for t in tiles), 3, side, side), dtype=np.float32)
        start = 0
        for image_tiles in tiles:
            # uint8 -> float32 and HWC -> CHW in one copy into the output
            pixel_values[start : start + len(image_tiles)] = image_tiles.transpose(0, 3, 1, 2)
            start += len(image_tiles)
        # Exactly torchvision's ToTensor (x / 255) then Normalize ((x - mean) / std), in float32, once for
        # all tiles. numpy gives the same IEEE results as torch here and, unlike torch's intra-op threads,
        # does not leave spinning OpenMP workers competing with the resize threads.
        pixel_values /= np.float32(255)
        pixel_values -= np.asarray(self.image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
        pixel_values /= np.asarray(self.image_std, dtype=np.float32).reshape(1, 3, 1, 1)
        return BatchFeature(
            {
                "pixel_values": torch.from_numpy(pixel_values),
                "image_sizes": torch.tensor([image.size for image in images], dtype=torch.int64).view(-1, 2),
                "num_tiles": torch.tensor([len(t) for t in tiles], dtype=torch.int64),
            }
        )

    def _tiles(self, images: list[Image.Image]) -> list[np.ndarray]:
        side = self.image_size
        global_view_jobs = [partial(squashed_view, image, side) for image in images]  # [1, S, S, 3] each
        if self.vision_token_mode == "base":
            return _run_parallel(global_view_jobs)
        grids = _grid_tuple(self.anyres_grids)
        plans = [plan_anyres(image.size, grids, side) for image in images]
        resize_jobs = [partial(resized_view, image, plan) for image, plan in zip(images, plans)]
        # The two resizes of every image are separate jobs, so one large image keeps two threads busy.
        views = _run_parallel(global_view_jobs + resize_jobs)
        global_views, resized = views[: len(images)], views[len(images) :]
        return [tiles_from_views(view[0], canvas, plan) for view, canvas, plan in zip(global_views, resized, plans)]
