"""A declarative, weighted mixture of sources, and the deterministic example stream it yields.

A mixture is a list of sources (YAML or a dict, see `configs/data/xgen-mm-pretrain.yaml`):

    sources:
      - name: obelics              # unique; prefixes the keys and the counters
        type: webdataset           # webdataset | parquet | llava | jsonl | hf
        path: /data/obelics/{00000..01999}.tar   # file, folder, glob, {a..b} range, or a list of them
        format: interleaved        # caption | interleaved | ocr | grounding | conversation | preference
        weight: 17.5               # relative; normalised over the mixture
        image_root: /data/images   # optional: where relative image paths point (default: the JSON's folder)
        options: {max_images: 6}   # optional: format options (see `Formatter`) and reader options
                                   # shuffle (true), interleave_shards (4), split (hf DatasetDicts)

`${VARS}` in paths are expanded; relative paths are relative to the YAML file.

Determinism. The data is read by `world_size × streams_per_rank` *streams*. Stream g is a pure
function of (mixture, seed, g, number of streams): its n-th draw picks a source with the n-th uniform
number of a seeded sequence (so the weights hold over draws), and each source hands stream g its own
part of every epoch — whole shards (shard g, g + S, ... of a seeded per-epoch shard order) when there
are at least S shards, otherwise every S-th row of each shard. Within its part a stream reads up to
`interleave_shards` shards round-robin. Across all streams every row of a source is read exactly once
per epoch. The position of a stream is a few integers per source — epoch, shards started, each open
shard's row position, whose turn it is — so it is saved in a checkpoint as plain JSON and restored by
re-opening those shards at those positions (a tar shard is re-read up to its position; tables seek).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import traceback
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from blip3.data.formats import Example, Formatter, Overlong, PreferenceExample
from blip3.data.readers import SOURCE_TYPES, RowItem, Shard, open_shards
from blip3.data.records import FORMATS, BadSample, SkipReason
from blip3.processing.processor import Blip3Processor

logger = logging.getLogger("blip3.data")

READER_OPTIONS = {"shuffle", "interleave_shards", "split"}
DEFAULT_INTERLEAVE_SHARDS = 4


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SourceSpec:
    name: str
    type: str
    path: str | tuple[str, ...]
    format: str
    weight: float = 1.0
    image_root: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"a source name must be a non-empty string without ':', got {self.name!r}")
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source {self.name!r}: type must be one of {SOURCE_TYPES}, got {self.type!r}")
        if self.format not in FORMATS:
            raise ValueError(f"source {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"source {self.name!r}: weight must be a positive number, got {self.weight!r}")

    @property
    def reader_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in READER_OPTIONS}

    @property
    def format_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k not in READER_OPTIONS}

    def identity(self) -> dict[str, Any]:
        """What defines the data this source yields, for checking a resumed run (paths may move)."""
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "weight": self.weight,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class Mixture:
    sources: tuple[SourceSpec, ...]

    def __post_init__(self):
        if not self.sources:
            raise ValueError("a mixture needs at least one source")
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        preference = {source.format == "preference" for source in self.sources}
        if len(preference) > 1:
            raise ValueError("preference sources cannot be mixed with other formats in one loader")

    @property
    def weights(self) -> list[float]:
        """The sources' weights, normalised to sum to 1."""
        total = sum(source.weight for source in self.sources)
        return [source.weight / total for source in self.sources]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Mixture:
        path = Path(path)
        return cls.from_dict(yaml.safe_load(path.read_text()), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any] | Sequence[Mapping[str, Any]], base_dir: str | os.PathLike | None = None
    ) -> Mixture:
        """From `{"sources": [...]}` or the list itself; relative paths are taken relative to `base_dir`."""
        entries = config.get("sources") if isinstance(config, Mapping) else config
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            raise ValueError("a mixture is a list of sources, or a mapping with a 'sources' list")
        sources = []
        for index, entry in enumerate(entries):
            entry = dict(entry)
            missing = [key for key in ("name", "type", "path", "format") if key not in entry]
            if missing:
                raise ValueError(f"source {index} lacks {missing}")
            unknown = set(entry) - {"name", "type", "path", "format", "weight", "image_root", "options"}
            if unknown:
                raise ValueError(f"source {entry['name']!r}: unknown keys {sorted(unknown)}")
            paths = entry["path"] if isinstance(entry["path"], (list, tuple)) else [entry["path"]]
            paths = tuple(_resolve(p, base_dir) for p in paths)
            entry["path"] = paths[0] if len(paths) == 1 else paths
            if entry.get("image_root") is not None:
                entry["image_root"] = _resolve(entry["image_root"], base_dir)
            entry["options"] = dict(entry.get("options") or {})
            sources.append(SourceSpec(**entry))
        return cls(tuple(sources))

    @classmethod
    def load(cls, mixture: Mixture | Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike) -> Mixture:
        """A mixture from itself, a dict / list of sources, or a YAML file."""
        if isinstance(mixture, Mixture):
            return mixture
        if isinstance(mixture, (str, os.PathLike)):
            return cls.from_yaml(mixture)
        return cls.from_dict(mixture)

    def identity(self) -> list[dict[str, Any]]:
        return [source.identity() for source in self.sources]


def _resolve(path: str, base_dir: str | os.PathLike | None) -> str:
    path = os.path.expandvars(str(path))
    # An unset ${VAR} stays in the path, untouched, so that the error on reading it names the variable.
    if base_dir is None or os.path.isabs(path) or "$" in path:
        return path
    return str(Path(base_dir) / path)


# ---------------------------------------------------------------------------------------------------
# Counters


@dataclass
class DataCounts:
    """What a stream did with its samples, per source: skipped (by reason), used, truncated to fit."""

    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)

    def count_skip(self, source: str, reason: str) -> None:
        by_reason = self.skipped.setdefault(source, {})
        by_reason[reason] = by_reason.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped": {source: dict(reasons) for source, reasons in self.skipped.items()},
            "used": dict(self.used),
            "truncated": dict(self.truncated),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> DataCounts:
        return cls(**cls.merge([state]).to_dict())

    @classmethod
    def merge(cls, counts: Iterable[Mapping[str, Any] | DataCounts]) -> DataCounts:
        """The sum of several counters (streams, workers, ranks), as dicts or `DataCounts`."""
        total = cls()
        for part in counts:
            part = part.to_dict() if isinstance(part, DataCounts) else part
            for source, reasons in part.get("skipped", {}).items():
                for reason, n in reasons.items():
                    total.skipped.setdefault(source, {})[reason] = total.skipped.get(source, {}).get(reason, 0) + n
            for name in ("used", "truncated"):
                target = getattr(total, name)
                for source, n in part.get(name, {}).items():
                    target[source] = target.get(source, 0) + n
        return total

    def skipped_by_reason(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for reasons in self.skipped.values():
            for reason, n in reasons.items():
                totals[reason] += n
        return dict(sorted(totals.items()))


# ---------------------------------------------------------------------------------------------------
# Seeds


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts, equal in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------
# One stream's position in one source


@dataclass
class PreparedSource:
    spec: SourceSpec
    shards: list[Shard]
    formatter: Formatter


def prepare_sources(
    mixture: Mixture, processor: Blip3Processor, *, max_length: int | None, overlong: Overlong, max_images: int
) -> list[PreparedSource]:
    """Each source's shards (its files are found now, so a bad path fails before training) and formatter."""
    prepared = []
    for spec in mixture.sources:
        try:
            shards = open_shards(spec.type, spec.path, spec.image_root, spec.reader_options)
        except ValueError as err:
            raise ValueError(f"source {spec.name!r}: {err}") from err
        formatter = Formatter(
            processor,
            spec.format,
            max_length=max_length,
            overlong=overlong,
            max_images=max_images,
            options=spec.format_options,
        )
        prepared.append(PreparedSource(spec, shards, formatter))
    return prepared


class SourceCursor:
    """Where one stream is in one source; `next()` gives its next row, epoch after epoch."""

    def __init__(self, source: PreparedSource, *, seed: int, stream: int, num_streams: int, epochs: int | None):
        self.name, self.shards = source.spec.name, source.shards
        self.seed, self.stream, self.num_streams, self.epochs = seed, stream, num_streams, epochs
        self.interleave = max(1, int(source.spec.reader_options.get("interleave_shards", DEFAULT_INTERLEAVE_SHARDS)))
        self.epoch = 0
        self.next_shard = 0  # how many of this epoch's shards (of this stream) have been opened
        self.open: list[list[int]] = []  # [shard index, position to read next], read round-robin
        self.turn = 0  # which open shard is read next
        self.good_in_epoch = 0  # rows of this epoch that became examples (told by the stream)
        self.ended = False
        self._iterators: dict[int, Iterator[tuple[int, RowItem]]] = {}
        self._plan_cache: tuple[int, tuple[list[int], int, int]] | None = None  # (epoch, plan)

    def _plan(self) -> tuple[list[int], int, int]:
        """This epoch's shards for this stream, and the first row position and stride within each."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            rng = np.random.default_rng(stable_seed(self.seed, self.name, "shards", self.epoch))
            order = rng.permutation(len(self.shards))
            if len(self.shards) >= self.num_streams:
                plan = order[self.stream :: self.num_streams].tolist(), 0, 1
            else:
                plan = order.tolist(), self.stream, self.num_streams
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def next(self) -> RowItem | None:
        """The next row (or bad row) of this stream's part of the source; None once it has ended."""
        while not self.ended:
            shards, start, stride = self._plan()
            while len(self.open) < self.interleave and self.next_shard < len(shards):
                self.open.append([shards[self.next_shard], start])
                self.next_shard += 1
            if not self.open:
                self._end_epoch()
                continue
            self.turn %= len(self.open)
            shard, position = self.open[self.turn]
            if shard not in self._iterators:
                rows_seed = stable_seed(self.seed, self.name, "rows", self.epoch, shard)
                self._iterators[shard] = self.shards[shard].rows(rows_seed, position, stride)
            try:
                item = next(self._iterators[shard], None)
            except Exception as error:  # noqa: BLE001 - readers report known failures as BadSamples; this is the rest
                logger.warning(
                    "reading shard %r of source %r failed", self.shards[shard].name, self.name, exc_info=True
                )
                item = (
                    None,
                    BadSample(SkipReason.UNREADABLE_FILE, f"{type(error).__name__}: {error}", self.shards[shard].name),
                )
            if item is None or item[0] is None:  # the shard is done; the next open one takes its turn
                del self.open[self.turn]
                del self._iterators[shard]
                if item is None:
                    continue
                return item[1]
            self.open[self.turn][1], row = item
            self.turn += 1
            return row
        return None

    def _end_epoch(self) -> None:
        if self.epochs is None and self.good_in_epoch == 0:
            # Without this an infinite stream would spin on a source that has nothing usable for it.
            logger.warning(
                "source %r gave stream %d no usable sample in epoch %d; the stream stops reading it",
                self.name,
                self.stream,
                self.epoch,
            )
            self.ended = True
            return
        self.epoch += 1
        self.next_shard, self.turn, self.good_in_epoch = 0, 0, 0
        self.ended = self.epochs is not None and self.epoch >= self.epochs

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_shard": self.next_shard,
            "open": [list(entry) for entry in self.open],
            "turn": self.turn,
            "good_in_epoch": self.good_in_epoch,
            "ended": self.ended,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.next_shard, self.turn = int(state["epoch"]), int(state["next_shard"]), int(state["turn"])
        self.open = [[int(shard), int(position)] for shard, position in state["open"]]
        self.good_in_epoch, self.ended = int(state["good_in_epoch"]), bool(state["ended"])
        self._iterators = {}  # re-opened at the saved positions when next read


# ---------------------------------------------------------------------------------------------------
# One stream: weighted draws over the sources, rows formatted into examples


_DRAW_BLOCK = 1024
_LOGGED_PER_REASON = 5  # skipped samples logged as warnings per (source, reason) and process; then debug


class ExampleStream:
    """The examples of stream `stream` of `num_streams`: a deterministic function of the seed and its position."""

    def __init__(
        self, sources: Sequence[PreparedSource], *, seed: int, stream: int, num_streams: int, epochs: int | None = None
    ):
        self.sources, self.seed, self.stream = list(sources), seed, stream
        self.weights = np.array([source.spec.weight for source in self.sources], dtype=np.float64)
        self.cursors = [
            SourceCursor(source, seed=seed, stream=stream, num_streams=num_streams, epochs=epochs)
            for source in self.sources
        ]
        self.draws = 0
        self.counts = DataCounts()
        self._uniforms: tuple[int, np.ndarray] | None = None
        self._logged: dict[tuple[str, str], int] = defaultdict(int)

    def _uniform(self, draw: int) -> float:
        block = draw // _DRAW_BLOCK
        if self._uniforms is None or self._uniforms[0] != block:
            rng = np.random.default_rng(stable_seed(self.seed, "mixture", self.stream, block))
            self._uniforms = (block, rng.random(_DRAW_BLOCK))
        return float(self._uniforms[1][draw % _DRAW_BLOCK])

    def _choose(self) -> int | None:
        """The source of the next draw, among those not ended (None when all have ended)."""
        active = [index for index, cursor in enumerate(self.cursors) if not cursor.ended]
        if not active:
            return None
        cumulative = np.cumsum(self.weights[active])
        u = self._uniform(self.draws) * cumulative[-1]
        self.draws += 1
        return active[min(int(np.searchsorted(cumulative, u, side="right")), len(active) - 1)]

    def __iter__(self) -> Iterator[Example | PreferenceExample]:
        return self

    def __next__(self) -> Example | PreferenceExample:
        while (index := self._choose()) is not None:
            source, cursor = self.sources[index], self.cursors[index]
            row = cursor.next()
            if row is None:  # it ended just now: the draw is spent, the next one picks among the others
                continue
            name = source.spec.name
            if isinstance(row, BadSample):
                self._skip(name, row)
                continue
            rng = random.Random(stable_seed(self.seed, name, cursor.epoch, row.key))
            try:
                example = source.formatter(row, rng)
            except BadSample as bad:
                self._skip(name, bad)
                continue
            except Exception as error:  # noqa: BLE001 - one odd sample must never end a long run
                self._skip(
                    name, BadSample(SkipReason.UNEXPECTED_ERROR, f"{type(error).__name__}: {error}", row.key), error
                )
                continue
            cursor.good_in_epoch += 1
            example.key = f"{name}:{example.key}"
            if getattr(example, "truncated", False):
                self.counts.truncated[name] = self.counts.truncated.get(name, 0) + 1
            return example
        raise StopIteration

    def _skip(self, source: str, bad: BadSample, error: Exception | None = None) -> None:
        self.counts.count_skip(source, bad.reason.value)
        seen = self._logged[source, bad.reason.value]
        self._logged[source, bad.reason.value] += 1
        level = logging.WARNING if seen < _LOGGED_PER_REASON else logging.DEBUG
        if logger.isEnabledFor(level):
            trace = "\n" + "".join(traceback.format_exception(error)) if error is not None else ""
            logger.log(level, "skipped a sample of %r (%s): %s%s", source, bad.reason.value, bad, trace)

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "sources": {source.spec.name: cursor.state_dict() for source, cursor in zip(self.sources, self.cursors)},
            "counts": self.counts.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draws = int(state["draws"])
        for source, cursor in zip(self.sources, self.cursors):
            cursor.load_state_dict(state["sources"][source.spec.name])
        self.counts = DataCounts.from_dict(state["counts"])
