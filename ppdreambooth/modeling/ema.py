"""Exponential moving average of the trained weights (`--use_ema`, `--ema_decay`).

The shadow weights are float32 tensors held here, outside the model: AMP O2 (which casts every
buffer and sub-layer of the model) never touches them and they never enter the optimizer. After each
optimizer step: shadow = d * shadow + (1 - d) * weight with d = min(ema_decay, (1 + n) / (10 + n)),
n the number of updates so far (the usual warm-up, so early averages are not dominated by the start).
They are saved in every checkpoint (`ema_state.pdparams`), restored on resume, and swapped into the
model for validation images and the final output.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict

import paddle

from ppdreambooth.runtime.streamed_save import streamed_save

EMA_STATE_NAME = "ema_state.pdparams"


class WeightEMA:
    def __init__(self, model, decay: float):
        self.model, self.decay, self.num_updates = model, decay, 0
        self.shadow: Dict[str, paddle.Tensor] = {
            name: param.detach().astype("float32").clone() for name, param in model.trainable_named_parameters()
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @paddle.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for name, param in self.model.trainable_named_parameters():
            shadow = self.shadow[name]
            shadow.set_value(shadow * d + param.detach().astype("float32") * (1.0 - d))
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates, "decay": self.decay}

    def set_state_dict(self, state: dict) -> None:
        for name, value in state["shadow"].items():
            self.shadow[name] = paddle.to_tensor(value, dtype="float32")
        self.num_updates = int(state["num_updates"])

    def save(self, folder: str) -> None:
        streamed_save(self.state_dict(), os.path.join(folder, EMA_STATE_NAME))  # no second full copy

    def load(self, folder: str) -> None:
        self.set_state_dict(paddle.load(os.path.join(folder, EMA_STATE_NAME), return_numpy=True))

    @paddle.no_grad()
    def copy_to_model(self) -> None:
        for name, param in self.model.trainable_named_parameters():
            param.set_value(self.shadow[name].astype(param.dtype))

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the EMA weights inside the block, its own weights again afterwards."""
        saved = {name: param.detach().clone() for name, param in self.model.trainable_named_parameters()}
        self.copy_to_model()
        try:
            yield
        finally:
            with paddle.no_grad():
                for name, param in self.model.trainable_named_parameters():
                    param.set_value(saved[name])
