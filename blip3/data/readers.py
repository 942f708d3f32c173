"""Readers: the files of a data source, read as shards of raw `Row`s.

A source (one entry of a mixture) is a list of shards. A shard yields its rows in an order fixed by
a seed, and can start reading at any position, which is what makes a data position resumable:

    webdataset   one shard per tar file (`.tar`, `.tar.gz`, `.tgz`), streamed with the `webdataset`
                 library in file order (tar files cannot be shuffled cheaply; write them shuffled).
    parquet      one shard per parquet file; row groups in a seeded order, rows shuffled within each.
    llava/jsonl  all `.json` (a list of objects) and `.jsonl` (one object per line) files of the
                 source as ONE shard, shuffled as a whole each epoch, as the original SFT loader
                 concatenates its JSON files. Lines are parsed only when read.
    hf           a `datasets` dataset saved with `save_to_disk`: one memory-mapped shard, shuffled.

`Shard.rows(seed, start, stride)` yields the rows at positions start, start + stride, ... of the
shard's order, each with the position to resume from after it. The stride lets several streams share
one shard (see `blip3.data.mixture`) while each reads only its own rows.

Failures are data too: a file that cannot be read, a JSON line that does not parse, a tar sample
with duplicate members come out as `BadSample`s at their position, so exactly one stream counts
each of them, and reading goes on with the next shard.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import webdataset as wds

from blip3.data.records import BadSample, Row, SkipReason

logger = logging.getLogger("blip3.data")

SOURCE_TYPES = ("webdataset", "parquet", "llava", "jsonl", "hf")
_EXTENSIONS = {
    "webdataset": (".tar", ".tar.gz", ".tgz"),
    "parquet": (".parquet",),
    "llava": (".json", ".jsonl"),
    "jsonl": (".json", ".jsonl"),
}

RowItem = Row | BadSample


class Shard(ABC):
    """A file (or a table of files) whose rows can be read from any position in a seeded order."""

    name: str  # prefix of the keys of its rows

    @abstractmethod
    def rows(self, seed: int, start: int, stride: int = 1) -> Iterator[tuple[int, RowItem]]:
        """(position to resume from, row) for positions start, start + stride, ... of the order for `seed`."""


def _owned(position: int, start: int, stride: int) -> bool:
    return position >= start and (position - start) % stride == 0


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards


class TarShard(Shard):
    """A webdataset tar file: samples are the members sharing a key (`<key>.png`, `<key>.txt`, ...)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def rows(self, seed: int, start: int, stride: int = 1) -> Iterator[tuple[int, RowItem]]:
        # webdataset reports errors to a handler and goes on; they are collected here and put into the
        # row stream at the position where they happened, so exactly one stream counts each.
        errors: list[Exception] = []

        def keep_going(error: Exception) -> bool:
            errors.append(error)
            return True

        duplicated_keys: set[str] = set()
        position, failed = 0, False
        samples = wds.tarfile_samples([{"url": str(self.path)}], handler=keep_going)
        while True:
            sample = next(samples, None)
            for error in errors:
                if _is_duplicate_member(error):
                    # webdataset keeps the first member and carries on; the sample is ambiguous, so it
                    # is skipped when it comes out (below) rather than used with either copy.
                    duplicated_keys.add(_duplicate_key(error))
                    continue
                if failed:  # a broken stream reports itself more than once; the file counts once
                    continue
                failed = True
                if _owned(position, start, stride):
                    yield position + stride, BadSample(SkipReason.UNREADABLE_FILE, _describe(error), self.name)
                position += 1
            errors.clear()
            if sample is None:
                return
            if _owned(position, start, stride):
                yield position + stride, self._row(sample, duplicated_keys)
            position += 1

    def _row(self, sample: dict[str, Any], duplicated_keys: set[str]) -> RowItem:
        key = f"{self.name}/{sample['__key__']}"
        if sample["__key__"] in duplicated_keys:
            return BadSample(SkipReason.DUPLICATE_MEMBER, "two members of the sample have the same name", key)
        members = {suffix: data for suffix, data in sample.items() if not suffix.startswith("__")}
        fields: Any = {}
        if "json" in members:
            try:
                fields = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return BadSample(SkipReason.UNREADABLE_JSON, f"member .json does not parse: {err}", key)
        return Row(key, fields, members)


def _is_duplicate_member(error: Exception) -> bool:
    return isinstance(error, ValueError) and "duplicate file name" in str(error)


def _duplicate_key(error: Exception) -> str:
    file_name = str(error.args[0]).split(":", 1)[0]
    return wds.tariterators.base_plus_ext(file_name)[0] or file_name


def _describe(error: Exception) -> str:
    if isinstance(error, tarfile.TarError):
        return f"not a readable tar file: {error.args[0] if error.args else error}"
    if isinstance(error, OSError):
        return f"cannot open: {error.strerror or error}"
    return f"{type(error).__name__}: {error.args[0] if error.args else error}"


# ---------------------------------------------------------------------------------------------------
# parquet files


class ParquetShard(Shard):
    """A parquet file; rows are its table rows (image columns as bytes, structs or relative paths)."""

    def __init__(self, path: Path, name: str, image_root: Path | None, shuffle: bool = True):
        self.path, self.name, self.image_root, self.shuffle = path, name, image_root, shuffle

    def rows(self, seed: int, start: int, stride: int = 1) -> Iterator[tuple[int, RowItem]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        except (OSError, pa.ArrowException) as err:
            if _owned(0, start, stride):
                yield (
                    start + stride,
                    BadSample(SkipReason.UNREADABLE_FILE, f"not a readable parquet file: {err}", self.name),
                )
            return
        first_row = np.concatenate([[0], np.cumsum(sizes)])  # of each group, in file order (for the keys)
        rng = np.random.default_rng(seed)
        group_order = rng.permutation(len(sizes)) if self.shuffle else np.arange(len(sizes))
        position = 0  # of the group's first row in this epoch's order
        for group in group_order:
            size = sizes[group]
            first = max(start, position)
            first += (start - first) % stride  # the first position of ours in this group
            owned = np.arange(first, position + size, stride)
            if len(owned):
                within = (
                    np.random.default_rng([seed, int(group)]).permutation(size) if self.shuffle else np.arange(size)
                )
                indices = within[owned - position]
                try:
                    table = parquet.read_row_group(int(group)).take(pa.array(indices))
                except (OSError, pa.ArrowException) as err:
                    yield (
                        int(owned[0]) + stride,
                        BadSample(SkipReason.UNREADABLE_FILE, f"row group {group}: {err}", self.name),
                    )
                    return
                for next_position, index, fields in zip(owned + stride, indices, table.to_pylist()):
                    key = f"{self.name}#{first_row[group] + index}"
                    yield int(next_position), Row(key, fields, image_root=self.image_root)
            position += size


# ---------------------------------------------------------------------------------------------------
# JSON tables (LLaVA .json lists, .jsonl files)


class JsonTable(Shard):
    """All JSON files of a source as one table, shuffled as a whole; loaded on first read."""

    def __init__(self, paths: Sequence[Path], names: Sequence[str], image_root: Path | None, shuffle: bool = True):
        self.paths, self.names, self.image_root, self.shuffle = list(paths), list(names), image_root, shuffle
        self.name = ",".join(self.names)
        self._entries: list[tuple[str, Path, Any]] | None = None  # (key, image root, object | line bytes | BadSample)

    def rows(self, seed: int, start: int, stride: int = 1) -> Iterator[tuple[int, RowItem]]:
        entries = self._load()
        order = np.random.default_rng(seed).permutation(len(entries)) if self.shuffle else np.arange(len(entries))
        for position in range(start, len(entries), stride):
            key, image_root, payload = entries[order[position]]
            yield position + stride, _json_row(key, image_root, payload)

    def _load(self) -> list[tuple[str, Path, Any]]:
        if self._entries is None:
            self._entries = []
            for path, name in zip(self.paths, self.names):
                self._entries += _json_entries(path, name, self.image_root or path.parent)
        return self._entries


def _json_entries(path: Path, name: str, image_root: Path) -> list[tuple[str, Path, Any]]:
    """One entry per object (`.json`) or non-blank line (`.jsonl`); one BadSample for an unreadable file."""
    try:
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            lines = [line for line in data.splitlines() if line.strip()]
            return [(f"{name}#{i}", image_root, line) for i, line in enumerate(lines)]
        objects = json.loads(data)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return [(name, image_root, BadSample(SkipReason.UNREADABLE_FILE, f"cannot read JSON file: {err}", name))]
    if not isinstance(objects, list):
        detail = f"a LLaVA JSON file holds a list of samples, not a {type(objects).__name__}"
        return [(name, image_root, BadSample(SkipReason.UNREADABLE_FILE, detail, name))]
    return [(f"{name}#{i}", image_root, obj) for i, obj in enumerate(objects)]


def _json_row(key: str, image_root: Path, payload: Any) -> RowItem:
    if isinstance(payload, BadSample):
        return payload
    if isinstance(payload, bytes):  # a JSONL line, parsed only now that it is read
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return BadSample(SkipReason.UNREADABLE_JSON, f"line does not parse: {err}", key)
    if not isinstance(payload, dict):
        return BadSample(SkipReason.INVALID_FIELD, f"expected a JSON object, got {type(payload).__name__}", key)
    return Row(key, payload, image_root=image_root)


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


class HFDatasetShard(Shard):
    """A `datasets.Dataset` saved with `save_to_disk`, memory-mapped and shuffled as a whole.

    Rows are read as Arrow and converted to Python without `datasets`' feature decoding, so image
    columns arrive as {"bytes", "path"}: decoding (and counting what fails) is ours to do.
    """

    def __init__(self, path: Path, name: str, image_root: Path | None, split: str | None, shuffle: bool = True):
        import datasets

        self.name, self.image_root, self.shuffle = name, image_root, shuffle
        # Opened now (it is only memory-mapped), so that a wrong path or split fails before training starts.
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise ValueError(f"{str(path)!r} is not a dataset saved with save_to_disk: {err}") from err
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{str(path)!r} holds splits {list(dataset)}: set the source option 'split' to one")
            dataset = dataset[split]
        self.dataset = dataset.with_format("arrow")

    def rows(self, seed: int, start: int, stride: int = 1) -> Iterator[tuple[int, RowItem]]:
        dataset = self.dataset
        order = np.random.default_rng(seed).permutation(len(dataset)) if self.shuffle else np.arange(len(dataset))
        for position in range(start, len(dataset), stride):
            index = int(order[position])
            fields = dataset[index].to_pylist()[0]
            yield position + stride, Row(f"{self.name}#{index}", fields, image_root=self.image_root)


# ---------------------------------------------------------------------------------------------------
# Files of a source


def open_shards(
    type: str, path: str | Sequence[str], image_root: str | Path | None = None, options: dict | None = None
) -> list[Shard]:
    """The shards of a source, from its file patterns (files, directories, globs, `{000..099}` ranges)."""
    options = options or {}
    root = Path(image_root) if image_root is not None else None
    shuffle = bool(options.get("shuffle", True))
    if type == "hf":
        location = Path(os.path.expandvars(path if isinstance(path, str) else path[0]))
        return [HFDatasetShard(location, location.name, root, options.get("split"), shuffle)]
    if type not in _EXTENSIONS:
        raise ValueError(f"unknown source type {type!r}; choose one of {SOURCE_TYPES}")
    files = resolve_files(path, _EXTENSIONS[type])
    names = _short_names(files)
    if type == "webdataset":
        return [TarShard(file, name) for file, name in zip(files, names)]
    if type == "parquet":
        return [ParquetShard(file, name, root, shuffle) for file, name in zip(files, names)]
    return [JsonTable(files, names, root, shuffle)]


def resolve_files(patterns: str | Sequence[str], extensions: Sequence[str]) -> list[Path]:
    """Files named by `patterns`, in order: `${VARS}` expanded, then `{a..b}` ranges, globs, directories.

    Files named explicitly (or by a `{a..b}` range) are kept even when missing: reading one is then
    counted as an unreadable file, like a corrupt one, and a long run does not die for a lost shard.
    That none of the files exists is a configuration error.
    """
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    files: list[Path] = []
    for pattern in patterns:
        for name in braceexpand.braceexpand(os.path.expandvars(os.fspath(pattern))):
            if glob.has_magic(name):
                files += sorted(Path(p) for p in glob.glob(name, recursive=True) if p.endswith(tuple(extensions)))
            elif Path(name).is_dir():
                files += sorted(p for p in Path(name).rglob("*") if p.is_file() and p.name.endswith(tuple(extensions)))
            else:
                files.append(Path(name))
    missing = [file for file in files if not file.exists()]
    if len(missing) == len(files):
        unset = " (an environment variable in it is not set)" if any("$" in os.fspath(p) for p in files) else ""
        raise ValueError(f"no {'/'.join(extensions)} files match {[os.fspath(p) for p in patterns]}{unset}")
    if missing:
        logger.warning(
            "%d of %d files are missing (they will count as unreadable), e.g. %s", len(missing), len(files), missing[0]
        )
    return files


def _short_names(files: Sequence[Path]) -> list[str]:
    """Names for keys: the paths relative to the files' common folder."""
    if len(files) == 1:
        return [files[0].name]
    common = Path(os.path.commonpath([file.parent.absolute() for file in files]))
    return [str(file.absolute().relative_to(common)) for file in files]
