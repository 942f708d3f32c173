"""The loader a trainer iterates: batches from a mixture, with DataLoader workers and exact resume.

    loader = build_loader("configs/data/xgen-mm-pretrain.yaml", processor, batch_size=8, seed=0,
                          rank=rank, world_size=world_size, num_workers=2, max_length=4096)
    for step, batch in zip(range(start_step, num_steps), loader):
        loss = model(**model_inputs(batch)).loss
        ...
        checkpoint["data"] = loader.state_dict()        # per rank
    loader.load_state_dict(checkpoint["data"])          # in the resumed run, before iterating

How the stream is laid out. Each rank owns `streams_per_rank` example streams (`blip3.data.mixture`),
each a deterministic function of (seed, its global index, the number of streams). Every stream cuts
its examples into batches of `batch_size` (sorted by length within groups of batches if
`length_grouping`), and the rank's batches take the streams in turn: stream 0's first batch, stream
1's first batch, ..., stream 0's second batch, ... DataLoader worker w runs streams w, w + W, ...;
torch's DataLoader returns the workers' items in turn, so the batch sequence is the same with any
number of workers that divides `streams_per_rank` (0 workers runs them all in this process).

Resume. Each batch travels from its worker with its stream's state right after it; the loader keeps,
per stream, the state of the last batch it *yielded to the trainer* (not of what workers have
prefetched), and which stream is next. `load_state_dict` restarts each stream there (a stream in
the middle of a length group re-draws the group and skips the batches already given) and rotates the
worker assignment so that the next stream comes first. The next batches are then bit-identical to
an uninterrupted run's. Iteration is infinite unless `epochs` is set (then each stream stops when
all its sources have been read that many times, and the last batch may be short).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip3.data.collate import collate, collate_preference, group_by_length
from blip3.data.formats import Overlong
from blip3.data.mixture import DataCounts, ExampleStream, Mixture, PreparedSource, prepare_sources, stable_seed
from blip3.data.records import SkipReason
from blip3.processing.processor import Blip3Processor

STATE_VERSION = 1
DEFAULT_GROUP_BATCHES = 8  # batches per length group when length_grouping=True


class BatchStream:
    """The batches of one example stream, each with the state to resume right after it."""

    def __init__(
        self,
        examples: ExampleStream,
        *,
        batch_size: int,
        group_batches: int,
        drop_last: bool,
        pad_token_id: int,
        preference: bool,
    ):
        self.examples, self.batch_size, self.group_batches = examples, batch_size, group_batches
        self.drop_last, self.pad_token_id, self.preference = drop_last, pad_token_id, preference
        self.used: dict[str, int] = {}
        self._skip_into_group = 0  # batches of the current group already yielded before a resume

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.examples.load_state_dict(state["position"])
        self.used = dict(state["used"])
        self._skip_into_group = int(state["batches_into_group"])

    def _state(self, position: dict[str, Any], used: dict[str, int], batches_into_group: int) -> dict[str, Any]:
        return {"position": position, "used": dict(used), "batches_into_group": batches_into_group}

    def _counts(self) -> dict[str, Any]:
        counts = self.examples.counts
        return DataCounts(counts.skipped, dict(self.used), counts.truncated).to_dict()

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]]:
        """(batch, state after it, counts after it); finally (None, final state, final counts) if it ends."""
        while True:
            group_start = self.examples.state_dict()
            used_at_start = dict(self.used)
            group = list(itertools.islice(self.examples, self.batch_size * self.group_batches))
            if self.group_batches > 1:
                rng = np.random.default_rng(
                    stable_seed(self.examples.seed, "groups", self.examples.stream, group_start["draws"])
                )
                batches = group_by_length(group, self.batch_size, rng)
            else:
                batches = [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
            if self.drop_last:
                for example in (e for batch in batches if len(batch) < self.batch_size for e in batch):
                    self.examples.counts.count_skip(_source(example.key), SkipReason.INCOMPLETE_BATCH.value)
                batches = [batch for batch in batches if len(batch) == self.batch_size]
            skip, self._skip_into_group = self._skip_into_group, 0
            for index, batch in enumerate(batches):
                for example in batch:
                    name = _source(example.key)
                    self.used[name] = self.used.get(name, 0) + 1
                if index < skip:  # yielded before the resume
                    continue
                if index == len(batches) - 1:
                    state = self._state(self.examples.state_dict(), self.used, 0)
                else:  # resuming here re-draws this group from its start and skips index + 1 batches
                    state = self._state(group_start, used_at_start, index + 1)
                yield self._collate(batch), state, self._counts()
            if len(group) < self.batch_size * self.group_batches:  # the example stream has ended
                yield None, self._state(self.examples.state_dict(), self.used, 0), self._counts()
                return

    def _collate(self, batch: list) -> dict[str, Any]:
        return (collate_preference if self.preference else collate)(batch, self.pad_token_id)


def _source(key: str) -> str:
    return key.split(":", 1)[0]


@dataclass
class StreamPlan:
    """Everything that makes this rank's batch streams; picklable, shipped to every DataLoader worker."""

    sources: list[PreparedSource]
    seed: int
    rank: int
    world_size: int
    streams_per_rank: int
    batch_size: int
    group_batches: int
    epochs: int | None
    drop_last: bool
    pad_token_id: int
    preference: bool

    def batch_stream(self, local: int) -> BatchStream:
        """The batch stream of this rank's `local`-th stream, from its start."""
        examples = ExampleStream(
            self.sources,
            seed=self.seed,
            stream=self.rank * self.streams_per_rank + local,
            num_streams=self.world_size * self.streams_per_rank,
            epochs=self.epochs,
        )
        return BatchStream(
            examples,
            batch_size=self.batch_size,
            group_batches=self.group_batches,
            drop_last=self.drop_last,
            pad_token_id=self.pad_token_id,
            preference=self.preference,
        )


@dataclass
class _Progress:
    """What the trainer has been given: per local stream, the state and counts after its last item."""

    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    counts: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_stream: int = 0
    batches: int = 0


class _StreamsDataset(IterableDataset):
    """What each DataLoader worker runs: its share of the rank's streams, taken in turn.

    Items are (local stream index, kind, payload): kind "batch" (payload: batch, state, counts), "end"
    (the stream has ended; payload: None, final state, counts) or "idle" (an ended stream's turn while
    the worker still runs others: it keeps every worker's turns aligned with the streams' turns).
    """

    def __init__(self, plan: StreamPlan, first_stream: int, states: Mapping[int, Any]):
        self.plan, self.first_stream, self.states = plan, first_stream, dict(states)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = self.plan.streams_per_rank
        turns = [(self.first_stream + i) % count for i in range(count)]
        mine = turns[worker::num_workers]
        streams = {}
        for local in mine:
            stream = self.plan.batch_stream(local)
            if local in self.states:
                stream.load_state_dict(self.states[local])
            streams[local] = iter(stream)
        ended: set[int] = set()
        while len(ended) < len(mine):
            for local in mine:
                if local in ended:
                    yield local, "idle", None
                    continue
                batch, state, counts = next(streams[local])
                if batch is None:
                    ended.add(local)
                    yield local, "end", (None, state, counts)
                else:
                    yield local, "batch", (batch, state, counts)


def _identity(item):
    return item


def _iterate(
    plan: StreamPlan, progress: _Progress, num_workers: int, pin_memory: bool, prefetch_factor: int
) -> Iterator[dict[str, Any]]:
    """The batches from `progress` on, recording in it what each yielded batch leaves behind.

    A free function, not a method: the loader holds this generator, and a generator holding the loader
    would make a reference cycle, which leaves the DataLoader workers to the cyclic garbage collector,
    whose finalisation order makes torch wait out a timeout per worker instead of stopping them.
    """
    dataset = _StreamsDataset(plan, progress.next_stream, progress.states)
    if num_workers == 0:
        items = iter(dataset)
    else:
        items = iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=num_workers,
                collate_fn=_identity,
                pin_memory=pin_memory,
                prefetch_factor=prefetch_factor,
                # Its own generator: creating the workers must not draw from the trainer's global RNG.
                generator=torch.Generator().manual_seed(plan.seed),
            )
        )
    for local, kind, payload in items:
        progress.next_stream = (local + 1) % plan.streams_per_rank
        if kind == "idle":
            continue
        batch, progress.states[local], progress.counts[local] = payload
        if kind == "batch":
            progress.batches += 1
            yield batch


class MixtureLoader:
    """Batches of a mixture for one rank; iterate it, checkpoint it with `state_dict()`. See the module docstring."""

    def __init__(
        self,
        mixture: Mixture,
        processor: Blip3Processor,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        streams_per_rank: int,
        max_length: int | None,
        overlong: Overlong,
        max_images: int,
        group_batches: int,
        epochs: int | None,
        drop_last: bool,
        pin_memory: bool,
        prefetch_factor: int,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if streams_per_rank < 1 or streams_per_rank % max(1, num_workers):
            raise ValueError(
                f"streams_per_rank ({streams_per_rank}) must be a positive multiple of num_workers ({num_workers})"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be at least 1 (or None: forever), got {epochs}")
        self.mixture = mixture
        self.max_length, self.overlong, self.max_images = max_length, overlong, max_images
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.plan = StreamPlan(
            sources=prepare_sources(
                mixture, processor, max_length=max_length, overlong=overlong, max_images=max_images
            ),
            seed=seed,
            rank=rank,
            world_size=world_size,
            streams_per_rank=streams_per_rank,
            batch_size=batch_size,
            group_batches=group_batches,
            epochs=epochs,
            drop_last=drop_last,
            pad_token_id=processor.pad_token_id,
            preference=mixture.sources[0].format == "preference",
        )
        self._progress = _Progress()
        self._iteration: Iterator | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()  # a new iteration continues from the last batch taken, not from what was prefetched
        self._iteration = _iterate(self.plan, self._progress, self.num_workers, self.pin_memory, self.prefetch_factor)
        return self._iteration

    def close(self) -> None:
        """Stop the current iteration and its workers (iterating again later continues where it stopped)."""
        if self._iteration is not None:
            self._iteration.close()
            self._iteration = None

    # -- state --------------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """What fixes the batch sequence (not the number of workers, nor where the files are)."""
        plan = self.plan
        return {
            "mixture": self.mixture.identity(),
            "seed": plan.seed,
            "rank": plan.rank,
            "world_size": plan.world_size,
            "streams_per_rank": plan.streams_per_rank,
            "batch_size": plan.batch_size,
            "max_length": self.max_length,
            "overlong": self.overlong,
            "max_images": self.max_images,
            "group_batches": plan.group_batches,
            "epochs": plan.epochs,
            "drop_last": plan.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position after the last batch taken: plain JSON-serialisable data."""
        progress = self._progress
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "batches": progress.batches,
            "next_stream": progress.next_stream,
            "streams": {str(local): state for local, state in progress.states.items()},
            "counts": {str(local): counts for local, counts in progress.counts.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()` of a loader with the same mixture and settings (workers may differ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')!r} (expected {STATE_VERSION})")
        saved, current = _json_normalised(state["config"]), _json_normalised(self._config())
        different = sorted(key for key in current.keys() | saved.keys() if current.get(key) != saved.get(key))
        if different:
            details = "; ".join(f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}" for key in different)
            raise ValueError(
                f"the data state was saved with other settings, so resuming would change the data: {details}"
            )
        self.close()
        self._progress = _Progress(
            states={int(local): stream for local, stream in state["streams"].items()},
            counts={int(local): counts for local, counts in state["counts"].items()},
            next_stream=int(state["next_stream"]),
            batches=int(state["batches"]),
        )

    # -- what has been read -------------------------------------------------------------------------

    @property
    def counts(self) -> DataCounts:
        """Skipped / used / truncated samples per source, up to the last batch taken (this rank)."""
        return DataCounts.merge(self._progress.counts.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, all sources together."""
        return self.counts.skipped_by_reason()

    @property
    def skipped_by_source(self) -> dict[str, dict[str, int]]:
        return self.counts.skipped

    @property
    def used(self) -> dict[str, int]:
        """Samples yielded in batches, per source."""
        return self.counts.used

    @property
    def truncated(self) -> dict[str, int]:
        """Samples shortened to fit max_length (trailing turns or text dropped), per source."""
        return self.counts.truncated

    @property
    def batches_yielded(self) -> int:
        return self._progress.batches

    @property
    def epochs_completed(self) -> dict[str, int]:
        """Per source, the epochs every stream of this rank has finished."""
        result = {}
        for source in self.mixture.sources:
            epochs = [state["position"]["sources"][source.name]["epoch"] for state in self._progress.states.values()]
            result[source.name] = min(epochs) if len(epochs) == self.plan.streams_per_rank else 0
        return result


def _json_normalised(value: Any) -> Any:
    """Tuples as lists, as a JSON round trip of a saved state gives them."""
    if isinstance(value, Mapping):
        return {str(k): _json_normalised(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_normalised(v) for v in value]
    return value


def build_loader(
    mixture: Mixture | Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    processor: Blip3Processor,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    streams_per_rank: int | None = None,
    max_length: int | None = None,
    overlong: Overlong = "drop_turns",
    max_images: int = 4,
    length_grouping: bool | int = False,
    epochs: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> MixtureLoader:
    """A resumable loader of `mixture` (a `Mixture`, its dict, or a YAML path) for `rank` of `world_size`.

    batch_size: samples per batch on this rank.
    num_workers: DataLoader worker processes (0: in this process); must divide `streams_per_rank`.
    streams_per_rank: independent example streams per rank (default: max(1, num_workers)). The batch
        sequence depends on it, not on num_workers: fix it (e.g. 2) to compare or resume runs with 0, 1
        or 2 workers.
    max_length: the most positions a sample may take after splicing (None: no limit).
    overlong: over max_length, "drop_turns" drops trailing conversation turns / document text (never
        into an image) and counts the sample as truncated, "skip" skips it; either way a sample that
        still does not fit is skipped as `too_long`.
    max_images: samples with more images are skipped (`too_many_images`); sources may override it.
    length_grouping: True (8 batches) or a number of batches per group, sorted by spliced length.
    epochs: stop after reading every source this many times (None: iterate forever).
    drop_last: drop a stream's last, incomplete batch (its samples count as `incomplete_batch`).
    """
    if length_grouping is True:
        group_batches = DEFAULT_GROUP_BATCHES
    else:
        group_batches = max(1, int(length_grouping or 1))
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return MixtureLoader(
        Mixture.load(mixture),
        processor,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        streams_per_rank=streams_per_rank if streams_per_rank is not None else max(1, num_workers),
        max_length=max_length,
        overlong=overlong,
        max_images=max_images,
        group_batches=group_batches,
        epochs=epochs,
        drop_last=drop_last,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
