"""blip3: train, post-train, evaluate and serve xGen-MM (BLIP-3) multimodal models.

Importing the package registers its classes with transformers' Auto classes, so
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` open folders that blip3 saved.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from blip3.config import Blip3Config, Blip3SamplerConfig, preset
from blip3.modeling.model import Blip3ForConditionalGeneration, Blip3Model

AutoConfig.register(Blip3Config.model_type, Blip3Config, exist_ok=True)
AutoConfig.register(Blip3SamplerConfig.model_type, Blip3SamplerConfig, exist_ok=True)
AutoModel.register(Blip3Config, Blip3Model, exist_ok=True)
AutoModelForImageTextToText.register(Blip3Config, Blip3ForConditionalGeneration, exist_ok=True)

__all__ = ["Blip3Config", "Blip3ForConditionalGeneration", "Blip3Model", "Blip3SamplerConfig", "preset"]
