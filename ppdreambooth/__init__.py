"""ppdreambooth: DreamBooth (full fine-tuning and LoRA) for Stable Diffusion on PaddlePaddle."""
from . import compat  # noqa: F401  (must run before ppdiffusers is imported)

__version__ = "0.1.0"
