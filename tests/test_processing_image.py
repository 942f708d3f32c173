"""Image loading (every odd input becomes RGB or a clear ImageError) and the image processor's pixels."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor

from blip3 import Blip3ImageProcessor, ImageError, load_image
from blip3.config import preset
from blip3.processing.anyres import XGENMM_GRIDS, anyres_tiles, count_vision_tokens, plan_anyres
from conftest import TINY_FIXTURE as TINY
from conftest import needs_tiny_fixture

FIXTURE_IMAGES = ["img_a1_22x22", "img_a2_640x480", "img_a3_1400x280"]


def encode(image: Image.Image, format: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- pixels ------------------------------------------------------------------------------------------


@needs_tiny_fixture
def test_fixture_pixels_are_bit_exact():
    expected = load_file(TINY / "inputs.safetensors")
    processor = Blip3ImageProcessor.from_model_config(preset("tiny"))
    out = processor([TINY / "images" / f"{name}.png" for name in FIXTURE_IMAGES])
    assert out["pixel_values"].dtype == torch.float32
    assert torch.equal(out["pixel_values"], torch.cat([expected[f"pixel_values.{name}"] for name in FIXTURE_IMAGES]))
    assert torch.equal(out["image_sizes"], torch.stack([expected[f"image_size.{name}"] for name in FIXTURE_IMAGES]))
    assert out["num_tiles"].tolist() == [3, 5, 4]


def test_normalisation_is_torchvision_to_tensor_then_normalize():
    # ToTensor + Normalize in float32, here with CLIP's mean/std rather than the fixture's 0.5
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    processor = Blip3ImageProcessor(image_size=28, image_mean=mean, image_std=std)
    images = [random_image(50, 37, seed=1), random_image(123, 300, seed=2)]
    tiles = torch.cat([torch.from_numpy(anyres_tiles(im, plan_anyres(im.size, XGENMM_GRIDS, 28))) for im in images])
    expected = (tiles.permute(0, 3, 1, 2).float().div(255) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert torch.equal(processor(images)["pixel_values"], expected)


def test_a_batch_is_its_images_in_order():
    processor = Blip3ImageProcessor(image_size=28)
    images = [random_image(w, h, seed=w) for w, h in [(20, 20), (90, 30), (30, 90), (64, 48)]]
    batch = processor(images)
    singles = [processor([image]) for image in images]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    assert batch["image_sizes"].tolist() == [list(image.size) for image in images]
    assert batch["num_tiles"].tolist() == [3, 4, 4, 5]
    assert batch["pixel_values"].shape == (16, 3, 28, 28)
    empty = processor([])
    assert empty["pixel_values"].shape == (0, 3, 28, 28) and empty["image_sizes"].shape == (0, 2)


def test_modes_base_and_anyres_fixed():
    image = random_image(90, 30)
    base = Blip3ImageProcessor(image_size=28, vision_token_mode="base")(image)
    squashed = torch.from_numpy(np.array(image.resize((28, 28), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(base["pixel_values"], (squashed.float().div(255) - 0.5).div(0.5)[None])
    assert base["num_tiles"].tolist() == [1]
    fixed = Blip3ImageProcessor(image_size=28, vision_token_mode="anyres-fixed")(image)
    patch = Blip3ImageProcessor(image_size=28, vision_token_mode="anyres-patch")(image)
    assert torch.equal(fixed["pixel_values"], patch["pixel_values"])  # same tiles, the model resamples them differently


@pytest.mark.parametrize("mode", ["anyres-patch", "anyres-fixed", "base"])
@pytest.mark.parametrize("size", [(22, 22), (640, 480), (1400, 280), (300, 1200)])
def test_vision_tokens_agree_with_the_model_config(mode, size):
    config = preset("tiny", vision_token_mode=mode)
    tokens = count_vision_tokens(size, mode, config.grids, config.image_size, config.tokens_per_tile)
    assert tokens == config.num_vision_tokens(size)
    assert Blip3ImageProcessor.from_model_config(config).num_tiles(size) == config.num_tiles(size)


def test_vision_tokens_of_the_reference_checks():
    # REFERENCE §10: 300×300 → 384 tokens, 640×480 and 1920×1080 → 640, 1200×300 → 512 (128 per tile)
    counts = {(300, 300): 384, (640, 480): 640, (1920, 1080): 640, (1200, 300): 512}
    for size, tokens in counts.items():
        assert count_vision_tokens(size, "anyres-patch", XGENMM_GRIDS, 384, 128) == tokens


def test_save_and_load_with_auto_image_processor(tmp_path):
    processor = Blip3ImageProcessor(
        image_size=28, anyres_grids=[(1, 2), (2, 1)], vision_token_mode="base", max_image_pixels=10**6
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Blip3ImageProcessor
    assert (loaded.image_size, loaded.anyres_grids, loaded.vision_token_mode) == (28, [[1, 2], [2, 1]], "base")
    assert loaded.max_image_pixels == 10**6
    image = random_image(70, 20)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


# -- loading -----------------------------------------------------------------------------------------


def test_sources_all_give_the_same_rgb_image(tmp_path):
    image = random_image(31, 17)
    path = tmp_path / "image.png"
    image.save(path)
    pixels = np.asarray(image)
    for source in [image, path, str(path), encode(image), bytearray(encode(image)), pixels]:
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (31, 17)
        np.testing.assert_array_equal(np.asarray(loaded), pixels)
    assert load_image(image) is image  # RGB without EXIF rotation is not copied


def test_grey_arrays_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (grey, grey[..., None]):
        loaded = np.asarray(load_image(array))
        assert loaded.shape == (3, 4, 3)
        np.testing.assert_array_equal(loaded, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "source, problem",
    [
        (b"", "empty"),
        (b"definitely not an image", "not in a recognised image format"),
        (encode(random_image(64, 64))[:400], "truncated or corrupt"),
        (png_header_only(50_000, 50_000), "too large"),  # PIL's own decompression-bomb limit
        (png_header_only(9_000, 9_000), "too large"),  # ours, checked before decoding
        (png_header_only(8, 8), "truncated or corrupt"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero size"),
        (np.zeros((4, 5, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 5, 2), dtype=np.uint8), "uint8"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (12345, "unsupported image input"),
    ],
    ids=[
        "zero-bytes",
        "garbage",
        "truncated-png",
        "pil-bomb",
        "our-bomb",
        "no-pixel-data",
        "zero-size-array",
        "float-array",
        "two-channel-array",
        "zero-size-image",
        "int",
    ],
)
def test_bad_inputs_raise_image_error(source, problem):
    with pytest.raises(ImageError, match=problem):
        load_image(source)


def test_files_that_cannot_be_read(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_the_pixel_limit_is_configurable():
    image = random_image(40, 30)
    assert load_image(image, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageError, match="40×30 pixels exceeds the limit of 1199"):
        load_image(encode(image), max_pixels=1199)
    with pytest.raises(ImageError, match="too large"):
        Blip3ImageProcessor(image_size=28, max_image_pixels=1199)([image])


def test_exif_orientation_is_applied():
    # stored 40×20, left half red, right half blue; orientation 6 = display rotated 90° clockwise
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    loaded = load_image(encode(Image.fromarray(stored), exif=exif))
    assert loaded.size == (20, 40)
    pixels = np.asarray(loaded)
    assert (pixels[:20] == (255, 0, 0)).all() and (pixels[20:] == (0, 0, 255)).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    samples = np.array([[0, 257 * 128, 65535, 257 * 7]], dtype=np.uint16)
    sixteen_bit, thirty_two_bit = Image.fromarray(samples), Image.fromarray(samples.astype(np.int32))
    assert (sixteen_bit.mode, thirty_two_bit.mode) == ("I;16", "I")
    for image, format in ((sixteen_bit, "PNG"), (thirty_two_bit, "TIFF")):
        for source in (image, encode(image, format)):
            pixels = np.asarray(load_image(source))
            np.testing.assert_array_equal(pixels[0, :, 0], [0, 128, 255, 7])
            assert (pixels == pixels[..., :1]).all()


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 255, 255, 0))  # red
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # black
    loaded = load_image(encode(cmyk, "TIFF"))
    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 0, 0)]


def test_transparency_is_composited_on_black():
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [250, 250, 250, 0]]], dtype=np.uint8)
    expected = np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0))
    for source in (Image.fromarray(rgba), encode(Image.fromarray(rgba)), rgba):
        np.testing.assert_allclose(np.asarray(load_image(source)), expected, atol=1)
    grey_alpha = Image.fromarray(np.array([[[200, 128], [90, 255]]], dtype=np.uint8), mode="LA")
    np.testing.assert_allclose(np.asarray(load_image(grey_alpha))[0, :, 0], [100, 90], atol=1)


def test_palette_transparency_is_black_and_opaque_entries_keep_their_colour():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, index 1 green
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    opaque = load_image(encode(palette))
    assert [opaque.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 255, 0)]
    transparent = load_image(encode(palette, transparency=0))
    assert [transparent.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (0, 255, 0)]


def _process_in_child(processor, queue):
    queue.put(processor([random_image(90, 30), random_image(20, 20)])["num_tiles"].tolist())


def test_thread_pool_survives_fork():
    # a forked child inherits the parent's thread pool object but none of its threads
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        processor = Blip3ImageProcessor(image_size=28)
        processor([random_image(90, 30), random_image(20, 20)])  # the parent's pool now exists
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_process_in_child, args=(processor, queue))
        child.start()
        assert queue.get(timeout=30) == [4, 3]
        child.join()
    finally:
        torch.set_num_threads(threads)
