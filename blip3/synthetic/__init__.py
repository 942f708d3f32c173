"""The embedded default: a procedurally generated vision-language world a tiny model learns in minutes.

In data-flow order:

    world.py      scenes: coloured shapes in a grid of cells, strings of text in two sizes, a hazard marker
    render.py     scenes -> PIL images (anti-aliased shapes, Pillow's bundled font)
    tasks.py      scenes -> captions, documents, OCR / grounding annotations, questions with canonical
                  answers (single- and multi-image), preference pairs, safety samples, POPE questions
    write.py      `build_world(out_dir, sizes, spec, seed)`: everything on disk in the formats of real
                  data (webdataset shards, LLaVA json, JSONL), train / validation / test splits with
                  held-out colour × shape pairs, a mixture YAML per training stage, manifest.json
    tokenizer.py  the world's byte-level BPE tokenizer with the chat and xGen-MM tokens
    config.py     `tiny_world_config(tokenizer, ...)`: a model whose vocabulary layout is the tokenizer's
    stage0.py     a tiny SigLIP trained on the caption pairs; its vision tower goes into the VLM
    cli.py        `blip3 world OUT` and `blip3 stage0 WORLD`
"""

from blip3.synthetic.config import tiny_world_config
from blip3.synthetic.stage0 import Stage0Settings, load_vision_tower, train_stage0
from blip3.synthetic.tokenizer import build_world_tokenizer, load_world_tokenizer
from blip3.synthetic.world import WorldSpec
from blip3.synthetic.write import WorldSizes, build_world

__all__ = [
    "Stage0Settings",
    "WorldSizes",
    "WorldSpec",
    "build_world",
    "build_world_tokenizer",
    "load_vision_tower",
    "load_world_tokenizer",
    "tiny_world_config",
    "train_stage0",
]
