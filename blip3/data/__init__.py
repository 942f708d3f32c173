"""The data layer: typed records, readers, formats, weighted mixtures, collation and a resumable loader.

Data flow, one module per step:

    records.py   the schemas of every kind of sample, and `Row` -> typed record (or `BadSample`)
    readers.py   files -> shards of raw rows: webdataset tars, parquet, LLaVA JSON / JSONL, HF datasets
    formats.py   record -> model-ready `Example` through the processor (pre-training text, chat, DPO pairs)
    mixture.py   YAML/dict mixture config; deterministic, resumable example streams over the sources
    collate.py   examples -> a batch of exactly the model's inputs; length grouping; micro-batch slicing
    loader.py    `build_loader`: batches for one rank, DataLoader workers, `state_dict()` for exact resume
    testing.py   images of every odd kind, tiny shards and a malformed corpus, for tests and trial runs
"""

from blip3.data.collate import MODEL_INPUT_NAMES, collate, collate_preference, model_inputs, slice_batch, split_batch
from blip3.data.formats import Example, Formatter, PreferenceExample, tokenize_preference_pair
from blip3.data.loader import MixtureLoader, build_loader
from blip3.data.mixture import DataCounts, Mixture, SourceSpec
from blip3.data.records import BadSample, Row, SkipReason, parse_record

__all__ = [
    "MODEL_INPUT_NAMES",
    "BadSample",
    "DataCounts",
    "Example",
    "Formatter",
    "Mixture",
    "MixtureLoader",
    "PreferenceExample",
    "Row",
    "SkipReason",
    "SourceSpec",
    "build_loader",
    "collate",
    "collate_preference",
    "model_inputs",
    "parse_record",
    "slice_batch",
    "split_batch",
    "tokenize_preference_pair",
]
