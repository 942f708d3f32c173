"""Readers: every file kind read as rows, resumable positions, strides that split a shard without
overlap, and broken files reported in-band instead of raised."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from blip3.data.readers import HFDatasetShard, JsonTable, ParquetShard, TarShard, open_shards, resolve_files
from blip3.data.records import BadSample, Row
from blip3.data.testing import png_bytes, write_caption_shards, write_json, write_jsonl, write_parquet, write_tar

RNG = np.random.default_rng(0)
PNG = png_bytes(RNG)


def keys(shard, seed=0, start=0, stride=1) -> list[str]:
    return [item.key for _, item in shard.rows(seed, start, stride)]


def assert_strides_partition(shard, seed: int, num_streams: int) -> None:
    """Every row is read by exactly one of `num_streams` strided readers, and resuming mid-way gives the rest."""
    everything = keys(shard, seed)
    parts = [keys(shard, seed, start, num_streams) for start in range(num_streams)]
    assert sorted(k for part in parts for k in part) == sorted(everything)
    assert parts[0] == everything[::num_streams]
    positions = [position for position, _ in shard.rows(seed, 0, num_streams)]
    for cut in range(len(positions)):
        assert keys(shard, seed, positions[cut], num_streams) == parts[0][cut + 1 :]


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards


def test_tar_shard_rows(tmp_path: Path):
    write_tar(
        tmp_path / "a.tar",
        [("k0.png", PNG), ("k0.txt", b"first"), ("k0.json", b'{"w": 1}'), ("k1.jpg", PNG), ("k1.txt", b"second")],
    )
    [shard] = open_shards("webdataset", str(tmp_path / "a.tar"))
    rows = [row for _, row in shard.rows(0, 0)]
    assert [row.key for row in rows] == ["a.tar/k0", "a.tar/k1"]
    assert rows[0].fields == {"w": 1} and rows[0].text_member("txt") == "first"
    assert rows[0].members["png"] == PNG and rows[1].image_members() == ["jpg"]


def test_tar_shard_strides_and_resume(tmp_path: Path):
    [path] = write_caption_shards(tmp_path, 1, 7)
    shard = TarShard(path, "shard")
    assert keys(shard) == [f"shard/s000-{i:05d}" for i in range(7)]
    assert_strides_partition(shard, seed=0, num_streams=3)


def test_broken_tar_files_are_rows_not_exceptions(tmp_path: Path):
    members = [m for i in range(5) for m in ((f"t{i}.png", png_bytes(RNG, (64, 64))), (f"t{i}.txt", b"x"))]
    path = write_tar(tmp_path / "cut.tar", members)
    with tarfile.open(path) as tar:
        cut = tar.getmember("t3.png").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(bytes(range(256)) * 8)

    def outcome(name):
        return [
            (row.reason.value if isinstance(row, BadSample) else row.key)
            for _, row in TarShard(tmp_path / name, name).rows(0, 0)
        ]

    # t2 comes out after the error: webdataset closes a sample when it meets the next key, here the end
    assert outcome("cut.tar") == ["cut.tar/t0", "cut.tar/t1", "unreadable_file", "cut.tar/t2"]  # counted once
    assert outcome("empty.tar") == ["unreadable_file"]
    assert outcome("noise.tar") == ["unreadable_file"]
    assert outcome("missing.tar") == ["unreadable_file"]
    # the error has a position of its own: with two streams, exactly one of them reports it
    shard = TarShard(tmp_path / "cut.tar", "cut.tar")
    reported = [row for start in (0, 1) for _, row in shard.rows(0, start, 2) if isinstance(row, BadSample)]
    assert len(reported) == 1


def test_tar_duplicate_members_skip_the_sample(tmp_path: Path):
    path = write_tar(
        tmp_path / "d.tar",
        [("a.png", PNG), ("a.txt", b"x"), ("b.png", PNG), ("b.png", PNG), ("b.txt", b"y"), ("c.png", PNG)],
    )
    rows = [row for _, row in TarShard(path, "d").rows(0, 0)]
    assert [type(row).__name__ for row in rows] == ["Row", "BadSample", "Row"]
    assert rows[1].reason.value == "duplicate_member" and rows[1].key == "d/b"


def test_unreadable_json_member(tmp_path: Path):
    path = write_tar(tmp_path / "j.tar", [("a.json", b"{oops"), ("a.png", PNG)])
    [(_, row)] = list(TarShard(path, "j").rows(0, 0))
    assert isinstance(row, BadSample) and row.reason.value == "unreadable_json"


# ---------------------------------------------------------------------------------------------------
# parquet


def test_parquet_rows_shuffle_per_seed_and_partition(tmp_path: Path):
    rows = [{"image": {"bytes": PNG, "path": None}, "caption": f"c{i}"} for i in range(10)]
    [shard] = open_shards("parquet", str(write_parquet(tmp_path / "p.parquet", rows, row_group_size=3)))
    first = keys(shard, seed=1)
    assert sorted(first) == sorted(f"p.parquet#{i}" for i in range(10))
    assert first == keys(shard, seed=1) and first != keys(shard, seed=2)
    assert_strides_partition(shard, seed=1, num_streams=3)
    row = next(r for _, r in shard.rows(1, 0) if r.key == "p.parquet#4")
    assert row.fields["caption"] == "c4" and row.fields["image"]["bytes"] == PNG


def test_parquet_unshuffled_and_unreadable(tmp_path: Path):
    write_parquet(tmp_path / "p.parquet", [{"image": PNG, "caption": str(i)} for i in range(4)])
    assert keys(ParquetShard(tmp_path / "p.parquet", "p", None, shuffle=False), seed=3) == [f"p#{i}" for i in range(4)]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    [(_, bad)] = list(ParquetShard(tmp_path / "bad.parquet", "bad", None).rows(0, 0))
    assert isinstance(bad, BadSample) and bad.reason.value == "unreadable_file"


# ---------------------------------------------------------------------------------------------------
# JSON tables


def test_json_and_jsonl_files_form_one_shuffled_table(tmp_path: Path):
    write_json(tmp_path / "a.json", [{"id": i} for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [{"id": 10}, b'{"id": ', ["list"], {"id": 11}])
    (tmp_path / "c.json").write_text("{broken")
    [table] = open_shards("llava", str(tmp_path))
    assert isinstance(table, JsonTable)
    items = [row for _, row in table.rows(0, 0)]
    rows = {row.key: row for row in items if isinstance(row, Row)}
    bad = {row.key: row.reason.value for row in items if isinstance(row, BadSample)}
    assert sorted(rows) == ["a.json#0", "a.json#1", "a.json#2", "b.jsonl#0", "b.jsonl#3"]
    assert bad == {"b.jsonl#1": "unreadable_json", "b.jsonl#2": "invalid_field", "c.json": "unreadable_file"}
    assert rows["b.jsonl#3"].fields == {"id": 11}
    assert rows["a.json#0"].image_root == tmp_path  # relative image paths are next to the JSON by default
    assert_strides_partition(table, seed=5, num_streams=4)


def test_llava_json_must_hold_a_list(tmp_path: Path):
    write_json(tmp_path / "d.json", {"id": 1})
    [(_, row)] = list(JsonTable([tmp_path / "d.json"], ["d.json"], None).rows(0, 0))
    assert isinstance(row, BadSample) and row.reason.value == "unreadable_file"


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_dataset_rows_keep_images_undecoded(tmp_path: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = {"image": [{"bytes": PNG, "path": None}] * 4, "caption": [f"c{i}" for i in range(4)]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    [shard] = open_shards("hf", str(tmp_path / "ds"))
    rows = [row for _, row in shard.rows(0, 0)]
    assert sorted(row.key for row in rows) == ["ds#0", "ds#1", "ds#2", "ds#3"]
    assert rows[0].fields["image"] == {"bytes": PNG, "path": None}
    assert_strides_partition(shard, seed=0, num_streams=3)

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(ValueError, match="split"):
        HFDatasetShard(tmp_path / "dd", "dd", None, split=None)
    assert len(HFDatasetShard(tmp_path / "dd", "dd", None, split="train").dataset) == 4


# ---------------------------------------------------------------------------------------------------
# Finding files; image references


def test_resolve_files(tmp_path: Path, monkeypatch):
    write_caption_shards(tmp_path / "shards", 3, 1)
    names = lambda files: [file.name for file in files]
    assert names(resolve_files(str(tmp_path / "shards"), (".tar",))) == [
        "shard-000.tar",
        "shard-001.tar",
        "shard-002.tar",
    ]
    assert names(resolve_files(str(tmp_path / "shards" / "*-00[02].tar"), (".tar",))) == [
        "shard-000.tar",
        "shard-002.tar",
    ]
    # a missing file of a range is kept (read as unreadable later), unless nothing exists at all
    monkeypatch.setenv("SHARDS", str(tmp_path / "shards"))
    assert len(resolve_files("${SHARDS}/shard-{000..003}.tar", (".tar",))) == 4
    with pytest.raises(ValueError, match="no .tar files match"):
        resolve_files(str(tmp_path / "nothing-{0..2}.tar"), (".tar",))


def test_resolve_image_references(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(PNG)
    table = Row("t#0", {}, image_root=tmp_path)
    assert table.resolve_image("a.png") == tmp_path / "a.png"
    assert table.resolve_image(str(tmp_path / "a.png")) == tmp_path / "a.png"
    assert table.resolve_image(PNG) == PNG
    assert table.resolve_image({"bytes": None, "path": "a.png"}) == tmp_path / "a.png"
    tar = Row("s.tar/doc", {}, {"0.png": PNG})
    assert tar.resolve_image("0.png") == PNG and tar.resolve_image("doc.0.png") == PNG
    for row, ref, reason in (
        (table, "b.png", "missing_image"),
        (tar, "1.png", "missing_image"),
        (table, 1.5, "invalid_field"),
    ):
        with pytest.raises(BadSample) as raised:
            row.resolve_image(ref)
        assert raised.value.reason.value == reason
