"""blip3: train, post-train, evaluate and serve xGen-MM (BLIP-3) multimodal models.

Importing the package registers its classes with transformers' Auto classes, so `AutoConfig`,
`AutoModelForImageTextToText`, `AutoImageProcessor` and `AutoProcessor` open folders blip3 saved.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from blip3.config import IGNORE_INDEX, Blip3Config, Blip3SamplerConfig, preset
from blip3.factory import create, load_pretrained
from blip3.modeling.model import Blip3ForConditionalGeneration, Blip3Model
from blip3.processing.chat import XGENMM_SYSTEM_PROMPT
from blip3.processing.image import Blip3ImageProcessor, ImageError, load_image
from blip3.processing.processor import Blip3Processor
from blip3.processing.tokenizer import add_xgenmm_special_tokens, build_tokenizer

AutoConfig.register(Blip3Config.model_type, Blip3Config, exist_ok=True)
AutoConfig.register(Blip3SamplerConfig.model_type, Blip3SamplerConfig, exist_ok=True)
AutoModel.register(Blip3Config, Blip3Model, exist_ok=True)
AutoModelForImageTextToText.register(Blip3Config, Blip3ForConditionalGeneration, exist_ok=True)
# One class serves both of transformers' image backends: it resizes with PIL and normalises with numpy.
AutoImageProcessor.register(
    Blip3Config, image_processor_classes={"pil": Blip3ImageProcessor, "torchvision": Blip3ImageProcessor}, exist_ok=True
)
AutoProcessor.register(Blip3Config, Blip3Processor, exist_ok=True)

__all__ = [
    "IGNORE_INDEX",
    "XGENMM_SYSTEM_PROMPT",
    "Blip3Config",
    "Blip3ForConditionalGeneration",
    "Blip3ImageProcessor",
    "Blip3Model",
    "Blip3Processor",
    "Blip3SamplerConfig",
    "ImageError",
    "add_xgenmm_special_tokens",
    "build_tokenizer",
    "create",
    "load_image",
    "load_pretrained",
    "preset",
]
