"""One place that returns a model together with its processor, so inference and training can't drift.

model, processor = blip3.load_pretrained("Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5")
model, processor = blip3.load_pretrained("runs/sft/final")          # a folder blip3 saved
model, processor = blip3.create("tiny", tokenizer)                   # new weights, named preset
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import cached_file

from blip3.config import Blip3Config, preset
from blip3.interop.xgenmm import read_official_config
from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.processing.processor import Blip3Processor


def load_pretrained(path: str | Path, **model_kwargs) -> tuple[Blip3ForConditionalGeneration, Blip3Processor]:
    """A model and its processor from a blip3 folder, a released xGen-MM checkpoint (no remote code), or a
    LoRA checkpoint (an adapter folder naming its base): the adapter is merged into the base's weights."""
    from blip3.training.lora import is_adapter_folder, load_adapted, merge_and_unload

    if is_adapter_folder(path) and not Path(path, "config.json").is_file():
        model, processor = load_adapted(path, **model_kwargs)
        return merge_and_unload(model), processor
    model = Blip3ForConditionalGeneration.from_pretrained(path, **model_kwargs)
    return model, load_processor(path, model.config)


def load_processor(path: str | Path, config: Blip3Config) -> Blip3Processor:
    if read_official_config(path) is not None:
        # The released folders hold Phi-3's tokenizer (+ <pad>); the image processor and the other xGen-MM
        # tokens came from remote code, so they are rebuilt here from the converted config.
        return Blip3Processor.from_config(config, AutoTokenizer.from_pretrained(path, config=config))
    processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor, Blip3Processor):
        raise ValueError(f"{path} holds no blip3 processor (found {type(processor).__name__})")
    return processor


def has_tokenizer(path: str | Path) -> bool:
    file = cached_file(
        str(path),
        "tokenizer_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return file is not None


def create(
    config: str | Blip3Config, tokenizer: PreTrainedTokenizerBase, **overrides
) -> tuple[Blip3ForConditionalGeneration, Blip3Processor]:
    """A freshly initialised model (a preset name or a config) and the processor for it and `tokenizer`."""
    if isinstance(config, str):
        config = preset(config, **overrides)
    elif overrides:
        raise ValueError("overrides apply to preset names only")
    processor = Blip3Processor.from_config(config, tokenizer)
    return Blip3ForConditionalGeneration(config), processor
