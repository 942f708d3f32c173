"""Data for tests, benchmarks and trial runs: images of every odd kind, tiny shards, a malformed corpus.

    corpus = write_malformed_corpus(tmp_path)            # ~45 good and ~50 bad items in 7 sources
    loader = build_loader(corpus.mixture, processor, batch_size=4, epochs=1, max_length=corpus.max_length)
    keys = [key for batch in loader for key in batch["sample_keys"]]
    assert sorted(keys) == sorted(corpus.expected_used("drop_turns"))
    assert loader.counts.skipped == corpus.expected_skipped("drop_turns")

Every bad item is recorded with the reason it must be skipped for, every good one with its key, so
a run over the corpus can be checked item by item. Images that look odd but are fine (CMYK, palette,
16-bit, alpha, EXIF-rotated, greyscale) are among the good items: they must be used, not skipped.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from blip3.data.records import SkipReason

WORDS = (
    "a red circle on the left and a blue square on the right of the picture with three shapes "
    "there are two objects the assistant describes image in detail what is this green star triangle"
).split()

# ---------------------------------------------------------------------------------------------------
# Images


def random_image(rng: np.random.Generator, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A noisy RGB image of (W, H) `size` with a solid rectangle, converted to `mode`."""
    width, height = size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    pixels[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode_image(image: Image.Image, format: str = "PNG", **save_options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    return buffer.getvalue()


def png_bytes(rng: np.random.Generator, size: tuple[int, int] = (64, 48)) -> bytes:
    return encode_image(random_image(rng, size))


ODD_IMAGE_KINDS = ("cmyk", "palette", "gray16", "rgba", "exif_rotated", "greyscale", "webp")


def odd_image(kind: str, rng: np.random.Generator, size: tuple[int, int] = (60, 40)) -> tuple[bytes, str]:
    """(bytes, file extension) of a valid image in an unusual encoding that `load_image` handles."""
    if kind == "cmyk":
        return encode_image(random_image(rng, size, "CMYK"), "JPEG"), "jpg"
    if kind == "palette":
        return encode_image(random_image(rng, size).convert("P", palette=Image.Palette.ADAPTIVE)), "png"
    if kind == "gray16":
        samples = rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)
        return encode_image(Image.fromarray(samples)), "png"  # a 16-bit greyscale PNG
    if kind == "rgba":
        rgba = random_image(rng, size, "RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(size))
        return encode_image(rgba), "png"
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display, so (W, H) becomes (H, W)
        return encode_image(random_image(rng, size), "JPEG", exif=exif), "jpeg"
    if kind == "greyscale":
        return encode_image(random_image(rng, size, "L"), "JPEG"), "jpg"
    if kind == "webp":
        return encode_image(random_image(rng, size), "WEBP"), "webp"
    raise ValueError(f"unknown odd image kind {kind!r}; choose one of {ODD_IMAGE_KINDS}")


BAD_IMAGE_KINDS = {
    "empty": SkipReason.EMPTY_IMAGE,
    "truncated": SkipReason.CORRUPT_IMAGE,
    "not_an_image": SkipReason.CORRUPT_IMAGE,
    "bad_header": SkipReason.CORRUPT_IMAGE,
    "bomb": SkipReason.IMAGE_TOO_LARGE,
}


def bad_image(kind: str, rng: np.random.Generator) -> bytes:
    """The bytes of a broken image file, named with `.png`; `BAD_IMAGE_KINDS[kind]` is why it is skipped."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        data = png_bytes(rng, (64, 64))
        return data[: len(data) // 2]
    if kind == "not_an_image":
        return b"this is not an image, just text in a .png file\n" * 4
    if kind == "bad_header":
        data = png_bytes(rng)
        return data[:16] + b"\x00" * 8 + data[24:]  # IHDR with width and height 0 and a wrong checksum
    if kind == "bomb":
        return png_claiming_size(rng, 20000, 20000)
    raise ValueError(f"unknown bad image kind {kind!r}; choose one of {tuple(BAD_IMAGE_KINDS)}")


def png_claiming_size(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` × `height` pixels (a decompression bomb's header)."""
    data = bytearray(png_bytes(rng, (8, 8)))
    # Bytes 8-32 are the IHDR chunk: length, b"IHDR", width, height, 5 more bytes, then its CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------------------------------------------
# Files


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar file holding `members` (name, data) in this order, as webdataset shards are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_jsonl(path: Path, lines: Sequence[Any]) -> Path:
    """One line per entry: JSON-encoded, or written as is when it is `bytes` (to write broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    )
    return path


def write_parquet(path: Path, rows: Sequence[dict[str, Any]], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path, row_group_size=row_group_size)
    return path


def sentence(rng: np.random.Generator, words: int = 8) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def write_caption_shards(
    directory: Path,
    num_shards: int,
    samples_per_shard: int,
    *,
    image_size: tuple[int, int] | Sequence[tuple[int, int]] = (64, 48),
    caption_words: int = 12,
    image_format: str = "PNG",
    seed: int = 0,
) -> list[Path]:
    """Caption-pair shards `shard-000.tar`, ... with `<key>.png|jpg` + `<key>.txt`; keys `s<shard>-<index>`.

    image_size: one (W, H), or a list cycled through, so that samples get different tile counts.
    """
    rng = np.random.default_rng(seed)
    sizes = [image_size] if isinstance(image_size[0], int) else list(image_size)
    extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[image_format]
    paths = []
    for shard in range(num_shards):
        members = []
        for index in range(samples_per_shard):
            key = f"s{shard:03d}-{index:05d}"
            size = sizes[(shard * samples_per_shard + index) % len(sizes)]
            members.append((f"{key}.{extension}", encode_image(random_image(rng, size), image_format)))
            members.append((f"{key}.txt", sentence(rng, caption_words).encode()))
        paths.append(write_tar(directory / f"shard-{shard:03d}.tar", members))
    return paths


# ---------------------------------------------------------------------------------------------------
# The malformed corpus


@dataclass
class MalformedCorpus:
    """What `write_malformed_corpus` wrote, and what a loader must make of it."""

    root: Path
    mixture: dict[str, Any]  # a mixture config over all its sources (equal weights)
    max_length: int  # the spliced-length limit the expectations assume
    good: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # source -> sample keys
    bad: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # source -> reason -> what was written
    truncatable: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # fit only if shortened

    def expected_used(self, overlong: str = "drop_turns") -> list[str]:
        """The keys of the samples one epoch must use, each once."""
        keys = [key for keys in self.good.values() for key in keys]
        if overlong == "drop_turns":
            keys += [key for keys in self.truncatable.values() for key in keys]
        return sorted(keys)

    def expected_skipped(self, overlong: str = "drop_turns") -> dict[str, dict[str, int]]:
        """source -> reason -> count of one epoch, for `DataCounts.skipped`."""
        expected = {
            source: {reason: len(items) for reason, items in reasons.items()} for source, reasons in self.bad.items()
        }
        if overlong == "skip":
            for source, keys in self.truncatable.items():
                if keys:
                    reasons = expected.setdefault(source, {})
                    reasons[SkipReason.TOO_LONG.value] = reasons.get(SkipReason.TOO_LONG.value, 0) + len(keys)
        return expected

    @property
    def num_bad(self) -> int:
        return sum(len(items) for reasons in self.bad.values() for items in reasons.values())

    def _good(self, source: str, key: str) -> None:
        self.good[source].add(f"{source}:{key}")

    def _bad(self, source: str, reason: SkipReason, what: str) -> None:
        self.bad.setdefault(source, {}).setdefault(reason.value, []).append(what)


def write_malformed_corpus(root: Path, *, seed: int = 0) -> MalformedCorpus:
    """Seven small sources (every reader and format but preference) with good and bad items mixed.

    Expectations assume `max_length=corpus.max_length`, `max_images=4`, and hold for any processor
    whose images take at most ~150 positions each (the `tiny` and `small` presets).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    corpus = MalformedCorpus(root, mixture={"sources": []}, max_length=1024)
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(2500))  # far over max_length on its own

    def source(name: str, type: str, path: Path | list[str], format: str, **extra: Any) -> None:
        paths = [str(p) for p in path] if isinstance(path, list) else str(path)
        entry = {"name": name, "type": type, "path": paths, "format": format, "weight": 1.0, **extra}
        corpus.mixture["sources"].append(entry)

    # -- caption pairs in tar shards ------------------------------------------------------------------
    name, folder = "captions", root / "captions"
    shards: list[list[tuple[str, bytes]]] = [[], []]

    def caption_sample(shard: int, key: str, members: list[tuple[str, bytes]]) -> None:
        shards[shard] += [(f"{key}.{suffix}", data) for suffix, data in members]

    for index, kind in enumerate(ODD_IMAGE_KINDS + ("plain", "plain", "plain")):
        data, extension = (png_bytes(rng), "png") if kind == "plain" else odd_image(kind, rng)
        key = f"good{index:02d}"
        caption_sample(index % 2, key, [(extension, data), ("txt", sentence(rng).encode())])
        corpus._good(name, f"captions-{index % 2}.tar/{key}")
    key = "meta"  # a valid optional .json beside the caption
    caption_sample(
        0, key, [("json", b'{"url": "http://example.com/a.png"}'), ("png", png_bytes(rng)), ("txt", b"with metadata")]
    )
    corpus._good(name, f"captions-0.tar/{key}")
    key = "long"  # a caption far over max_length: cut to fit, or skipped with overlong="skip"
    caption_sample(1, key, [("png", png_bytes(rng)), ("txt", long_text.encode())])
    corpus.truncatable[name].add(f"{name}:captions-1.tar/{key}")
    for index, kind in enumerate(BAD_IMAGE_KINDS):
        key = f"badimage{index}"
        caption_sample(index % 2, key, [("png", bad_image(kind, rng)), ("txt", b"a caption")])
        corpus._bad(name, BAD_IMAGE_KINDS[kind], f"captions-{index % 2}.tar/{key}")
    bad_captions = [
        ("nocaption", [("png", png_bytes(rng))], SkipReason.MISSING_FIELD),
        ("noimage", [("txt", b"a caption without its image")], SkipReason.MISSING_IMAGE),
        ("emptycaption", [("png", png_bytes(rng)), ("txt", b"   ")], SkipReason.EMPTY_TEXT),
        (
            "twoimages",
            [("jpg", png_bytes(rng)), ("png", png_bytes(rng)), ("txt", b"which one?")],
            SkipReason.IMAGE_TOKEN_MISMATCH,
        ),
        (
            "imagetoken",
            [("png", png_bytes(rng)), ("txt", b"a <image> inside the caption")],
            SkipReason.IMAGE_TOKEN_MISMATCH,
        ),
        (
            "badjson",
            [("json", b"{not json"), ("png", png_bytes(rng)), ("txt", b"a caption")],
            SkipReason.UNREADABLE_JSON,
        ),
        ("latin1", [("png", png_bytes(rng)), ("txt", "caf\xe9".encode("latin-1"))], SkipReason.INVALID_FIELD),
        (
            "dupe",
            [("png", png_bytes(rng)), ("png", png_bytes(rng)), ("txt", b"two members named dupe.png")],
            SkipReason.DUPLICATE_MEMBER,
        ),
    ]
    for index, (key, members, reason) in enumerate(bad_captions):
        caption_sample(index % 2, key, members)
        corpus._bad(name, reason, f"captions-{index % 2}.tar/{key}")
    for shard, members in enumerate(shards):
        write_tar(folder / f"captions-{shard}.tar", members)
    # A shard cut in the middle of its fourth sample: the first three are read, then the file is unreadable.
    truncated = write_tar(
        folder / "truncated.tar",
        [
            m
            for i in range(5)
            for m in ((f"t{i}.png", png_bytes(rng, (64, 64))), (f"t{i}.txt", b"from a truncated shard"))
        ],
    )
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("t3.png").offset_data + 100
    truncated.write_bytes(truncated.read_bytes()[:cut])
    for i in range(3):
        corpus._good(name, f"truncated.tar/t{i}")
    corpus._bad(name, SkipReason.UNREADABLE_FILE, "truncated.tar")
    (folder / "empty.tar").write_bytes(b"")
    corpus._bad(name, SkipReason.UNREADABLE_FILE, "empty.tar")
    (folder / "garbage.tar").write_bytes(b"\x1f\x8b" + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    corpus._bad(name, SkipReason.UNREADABLE_FILE, "garbage.tar")
    source(name, "webdataset", folder, "caption")

    # -- interleaved documents in a tar shard ---------------------------------------------------------
    name = "documents"
    members: list[tuple[str, bytes]] = []

    def document(key: str, texts: list, images: list, files: dict[str, bytes], reason: SkipReason | None) -> None:
        members.append((f"{key}.json", json.dumps({"texts": texts, "images": images}).encode()))
        members.extend((f"{key}.{file}", data) for file, data in files.items())
        if reason is None:
            corpus._good(name, f"documents.tar/{key}")
        else:
            corpus._bad(name, reason, f"documents.tar/{key}")

    for index in range(4):
        count = 1 + index % 3
        texts = [sentence(rng) if i % 2 == 0 else None for i in range(2 * count)]
        images = [None if i % 2 == 0 else f"{i // 2}.png" for i in range(2 * count)]
        document(
            f"doc{index}", texts, images, {f"{i}.png": png_bytes(rng, (40 + 10 * i, 40)) for i in range(count)}, None
        )
    document("imagefirst", [None, "text after the image"], ["imagefirst.0.png", None], {"0.png": png_bytes(rng)}, None)
    document("textonly", ["only text here", "and more"], [None, None], {}, None)
    document("lengths", ["a", None, "b"], [None, "0.png"], {"0.png": png_bytes(rng)}, SkipReason.INVALID_FIELD)
    document("both", ["a", "b"], [None, "0.png"], {"0.png": png_bytes(rng)}, SkipReason.INVALID_FIELD)
    document("missing", ["a", None], [None, "0.png"], {}, SkipReason.MISSING_IMAGE)
    document(
        "extra",
        ["a", None],
        [None, "0.png"],
        {"0.png": png_bytes(rng), "1.png": png_bytes(rng)},
        SkipReason.IMAGE_TOKEN_MISMATCH,
    )
    document(
        "many",
        ["a", None, None, None, None, None],
        [None, *(f"{i}.png" for i in range(5))],
        {f"{i}.png": png_bytes(rng) for i in range(5)},
        SkipReason.TOO_MANY_IMAGES,
    )
    document("corrupt", ["a", None], [None, "0.png"], {"0.png": bad_image("truncated", rng)}, SkipReason.CORRUPT_IMAGE)
    document("notext", [None], ["0.png"], {"0.png": png_bytes(rng)}, SkipReason.EMPTY_TEXT)
    members += [("badjson.json", b'{"texts": ["a"'), ("badjson.0.png", png_bytes(rng))]
    corpus._bad(name, SkipReason.UNREADABLE_JSON, "documents.tar/badjson")
    members += [("notexts.json", b'{"images": [null]}')]
    corpus._bad(name, SkipReason.MISSING_FIELD, "documents.tar/notexts")
    write_tar(root / "documents" / "documents.tar", members)
    source(name, "webdataset", root / "documents" / "documents.tar", "interleaved")

    # -- OCR and grounding samples in tar shards ------------------------------------------------------
    for name, format, good, bad in (
        (
            "ocr",
            "ocr",
            [
                {
                    "ocr": [{"text": "MACK SHOP", "box": [0.19, 0.04, 0.82, 0.2]}, {"text": "OPEN"}],
                    "caption": "A shop.",
                },
                {"ocr": [{"text": "EXIT", "box": [0, 0, 1, 1]}]},
                {"ocr": [{"text": "42", "box": [0.5, 0.5, 0.6, 0.6]}]},
            ],
            [
                ({"ocr": [{"text": "A", "box": [0.1, 0.2, 0.3, 0.4, 0.5]}]}, SkipReason.INVALID_FIELD),
                ({"ocr": [{"text": "A", "box": [0.1, 0.2, 1.3, 0.4]}]}, SkipReason.INVALID_FIELD),
                ({"ocr": {"text": "MACK SHOP"}}, SkipReason.INVALID_FIELD),
                ({"caption": "no ocr field"}, SkipReason.MISSING_FIELD),
                ({"ocr": []}, SkipReason.EMPTY_TEXT),
            ],
        ),
        (
            "grounding",
            "grounding",
            [
                {
                    "caption": "a red circle next to a blue square",
                    "objects": [
                        {"phrase": "red circle", "box": [0.12, 0.3, 0.4, 0.62]},
                        {"phrase": "blue square", "box": [0.5, 0.3, 0.9, 0.7]},
                    ],
                },
                {"caption": "a green star", "objects": [{"phrase": "triangle", "box": [0, 0, 0.5, 0.5]}]},
                {"caption": "nothing to box", "objects": []},
            ],
            [
                ({"caption": "x", "objects": [{"box": [0, 0, 1, 1]}]}, SkipReason.INVALID_FIELD),
                ({"caption": "x", "objects": [{"phrase": "x", "box": [0.9, 0, 0.1, 1]}]}, SkipReason.INVALID_FIELD),
                ({"objects": [{"phrase": "x", "box": [0, 0, 1, 1]}]}, SkipReason.MISSING_FIELD),
            ],
        ),
    ):
        members = []
        for index, fields in enumerate(good):
            members += [(f"good{index}.json", json.dumps(fields).encode()), (f"good{index}.png", png_bytes(rng))]
            corpus._good(name, f"{name}.tar/good{index}")
        for index, (fields, reason) in enumerate(bad):
            members += [(f"bad{index}.json", json.dumps(fields).encode()), (f"bad{index}.png", png_bytes(rng))]
            corpus._bad(name, reason, f"{name}.tar/bad{index}")
        write_tar(root / name / f"{name}.tar", members)
        source(name, "webdataset", root / name / f"{name}.tar", format)

    # -- LLaVA conversations: a JSON list and an image folder -----------------------------------------
    name, folder = "sft", root / "sft"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index in range(6):
        (images / f"{index}.png").write_bytes(png_bytes(rng, (30 + 20 * index, 40)))
    (images / "cmyk.jpg").write_bytes(odd_image("cmyk", rng)[0])
    (images / "corrupt.png").write_bytes(bad_image("not_an_image", rng))
    (images / "empty.png").write_bytes(b"")
    human = lambda text: {"from": "human", "value": text}
    gpt = lambda text: {"from": "gpt", "value": text}
    records: list[tuple[dict[str, Any], SkipReason | None | str]] = [
        ({"image": "0.png", "conversations": [human("<image>\nWhat is this?"), gpt("A red circle.")]}, None),
        (
            {
                "image": "cmyk.jpg",
                "conversations": [human("What is this?"), gpt("A CMYK picture, no image token in the question.")],
            },
            None,
        ),
        (
            {
                "image": "1.png",
                "conversations": [human("<image> and <image>?"), gpt("Two tokens for one image: fixed.")],
            },
            None,
        ),
        (
            {
                "image": ["2.png", "3.png"],
                "conversations": [human("<image> vs <image>: which is larger?"), gpt("The second.")],
            },
            None,
        ),
        ({"conversations": [human("Text only."), gpt("Fine."), human("Again?"), gpt("Yes.")]}, None),
        (
            {
                "image": "4.png",
                "conversations": [gpt("A leading answer is dropped."), human("<image>\nAnd?"), gpt("Then it is fine.")],
            },
            None,
        ),
        ({"conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hi.")]}, None),
        (
            {
                "image": "5.png",
                "conversations": [
                    human("<image>\nShort question?"),
                    gpt("Short answer."),
                    human(long_text),
                    gpt("Long."),
                ],
            },
            "truncatable",
        ),
        (
            {"image": "missing.png", "conversations": [human("<image>\nWhat?"), gpt("Nothing.")]},
            SkipReason.MISSING_IMAGE,
        ),
        ({"image": "corrupt.png", "conversations": [human("<image>\nWhat?"), gpt("Noise.")]}, SkipReason.CORRUPT_IMAGE),
        ({"image": "empty.png", "conversations": [human("<image>\nWhat?"), gpt("Nothing.")]}, SkipReason.EMPTY_IMAGE),
        (
            {"conversations": [human("<image>\nText-only sample with a token"), gpt("Bad.")]},
            SkipReason.IMAGE_TOKEN_WITHOUT_IMAGE,
        ),
        (
            {"image": [f"{i}.png" for i in range(5)], "conversations": [human("<image>" * 5), gpt("Too many.")]},
            SkipReason.TOO_MANY_IMAGES,
        ),
        (
            {"image": ["0.png", "1.png"], "conversations": [human("Only <image> one token"), gpt("Mismatch.")]},
            SkipReason.IMAGE_TOKEN_MISMATCH,
        ),
        ({"image": "0.png"}, SkipReason.MISSING_FIELD),
        (
            {"image": "0.png", "conversations": [human("<image>\nA"), human("B"), gpt("C")]},
            SkipReason.INVALID_CONVERSATION,
        ),
        ({"conversations": [human(7), gpt("Not a string.")]}, SkipReason.INVALID_CONVERSATION),
        ({"conversations": [human("No answer.")]}, SkipReason.INVALID_CONVERSATION),
        ({"image": "0.png", "conversations": [human("<image>\n" + long_text), gpt("Too long.")]}, SkipReason.TOO_LONG),
        ({"image": 5, "conversations": [human("<image>\nA number as image."), gpt("Bad.")]}, SkipReason.INVALID_FIELD),
        ("not an object", SkipReason.INVALID_FIELD),
    ]
    samples = []
    for index, (record, outcome) in enumerate(records):
        if isinstance(record, dict):
            record = {"id": f"sample-{index}", **record}
        samples.append(record)
        key = f"sft.json#{index}"
        if outcome is None:
            corpus._good(name, key)
        elif outcome == "truncatable":
            corpus.truncatable[name].add(f"{name}:{key}")
        else:
            corpus._bad(name, outcome, key)
    write_json(folder / "sft.json", samples)
    (folder / "broken.json").write_text('[{"id": 1, "conversations": [')
    corpus._bad(name, SkipReason.UNREADABLE_FILE, "broken.json")
    source(
        name, "llava", [str(folder / "sft.json"), str(folder / "broken.json")], "conversation", image_root=str(images)
    )

    # -- caption rows in JSONL, images by relative path ------------------------------------------------
    name, folder = "pairs", root / "pairs"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines: list[Any] = []
    for index in range(4):
        (folder / "img" / f"{index}.png").write_bytes(png_bytes(rng))
        lines.append({"image": f"img/{index}.png", "caption": sentence(rng)})
        corpus._good(name, f"pairs.jsonl#{len(lines) - 1}")
    for line, reason in (
        (b'{"image": "img/0.png", "caption": ', SkipReason.UNREADABLE_JSON),
        (["a", "list"], SkipReason.INVALID_FIELD),
        ({"image": "img/0.png", "caption": 3}, SkipReason.INVALID_FIELD),
        ({"image": "img/nope.png", "caption": "missing file"}, SkipReason.MISSING_IMAGE),
        ({"caption": "no image at all"}, SkipReason.MISSING_IMAGE),
    ):
        lines.append(line)
        corpus._bad(name, reason, f"pairs.jsonl#{len(lines) - 1}")
    write_jsonl(folder / "pairs.jsonl", lines)
    source(name, "jsonl", folder / "pairs.jsonl", "caption")

    # -- caption rows in parquet, images as bytes -------------------------------------------------------
    name, folder = "parquet", root / "parquet"
    rows: list[dict[str, Any]] = []
    for index in range(4):
        rows.append({"image": {"bytes": png_bytes(rng), "path": None}, "caption": sentence(rng)})
        corpus._good(name, f"part-0.parquet#{index}")
    for image, reason in (
        (None, SkipReason.MISSING_IMAGE),
        ({"bytes": bad_image("not_an_image", rng), "path": None}, SkipReason.CORRUPT_IMAGE),
        ({"bytes": bad_image("bomb", rng), "path": None}, SkipReason.IMAGE_TOO_LARGE),
    ):
        rows.append({"image": image, "caption": "a caption"})
        corpus._bad(name, reason, f"part-0.parquet#{len(rows) - 1}")
    write_parquet(folder / "part-0.parquet", rows, row_group_size=3)
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    corpus._bad(name, SkipReason.UNREADABLE_FILE, "broken.parquet")
    source(name, "parquet", folder, "caption")
    return corpus
