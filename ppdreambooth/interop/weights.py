"""Weights between Paddle's layout and PyTorch's: Paddle stores Linear weights as [in, out], PyTorch as
[out, in]; converted weights are loaded into a model only when every one of them is there with its shape."""
from __future__ import annotations

from typing import Dict

import numpy as np

from ppdreambooth.errors import ConfigError


def lora_state_in_torch_layout(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """LoRA matrices (every 2-D array) in PyTorch's layout."""
    return {k: np.ascontiguousarray(v.T) if v.ndim == 2 else v for k, v in state.items()}


def model_state_in_torch_layout(model) -> Dict[str, np.ndarray]:
    """A model's weights as numpy arrays in PyTorch's layout (ppdiffusers transposes exactly its Linear weights)."""
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_paddle_state_dict_to_pytorch

    state = {k: v.astype("float32").numpy() for k, v in model.state_dict().items()}
    convert_paddle_state_dict_to_pytorch(model, state)  # transposes Linear weights in place
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def set_converted_weights(model, state: Dict[str, np.ndarray], what: str, strict: bool) -> None:
    """Load converted weights (Paddle layout) into `model`; with `strict`, stop when the file lacked any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(k for k in expected if k not in state)
    if strict and missing:
        raise ConfigError(f"the single file lacks {len(missing)} weights of the {what}, e.g. "
                          f"{', '.join(missing[:3])}; is --single_file_config the same architecture?")
    # Paddle skips a weight of another shape with a warning only: that would leave it at its initial value
    misshapen = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if strict and misshapen:
        raise ConfigError(f"{len(misshapen)} weights of the {what} in the single file have other shapes than "
                          f"--single_file_config describes, e.g. {misshapen[0]} {tuple(state[misshapen[0]].shape)} "
                          f"vs {expected[misshapen[0]]}: is it the same architecture?")
    model.set_state_dict(state)
