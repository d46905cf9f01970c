"""ppdreambooth: DreamBooth (full fine-tuning and LoRA) for Stable Diffusion 1.x/2.x, SDXL and SD3 on PaddlePaddle."""
import warnings

# Two notes Paddle's import prints on every start that no user can act on (a missing compiler cache for custom
# operators, and setuptools' distutils shim): silenced here, before anything imports paddle.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")

from ppdreambooth.runtime import compat  # noqa: E402,F401  (must run before ppdiffusers is imported)

__version__ = "0.1.0"
