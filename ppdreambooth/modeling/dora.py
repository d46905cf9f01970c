"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): `--lora_type dora`.

Each adapted Linear computes with the weight

    W' = m * (W + s * A @ B) / ||W + s * A @ B||

where W is the frozen base weight, A @ B * s the LoRA update (s = alpha / rank) and m a trained magnitude, one per
OUTPUT feature. Paddle's `nn.Linear` stores W as [in, out] (PyTorch: [out, in]), so the norm here is over axis 0
of the Paddle weight: the norm of each output feature's column, which is PEFT's norm over each row of the PyTorch
weight. m starts as the base weight's per-output norms and B as zeros, so at initialisation W' == W and the model
is the base model exactly. As PEFT does (and section 4.3 of the paper suggests), the norm is treated as a constant
in the backward pass: it follows the update in the forward pass but receives no gradient.

Why written here: ppdiffusers 0.29's own peft (`ppdiffusers.peft`, a port of an older PEFT) has no DoRA: its
`LoraConfig` has no `use_dora` and its LoRA `Linear` no magnitude. So the adapters are made by ppdiffusers' peft as
for LoRA (same A and B, same names, same saving), and each adapted Linear then gets a magnitude parameter named as
PEFT >= 0.9 names it (`<module>.lora_magnitude_vector`, the key diffusers' `load_lora_weights` reads) and a forward
that computes DoRA, written in PEFT's form (`DoraLinearLayer.forward`):

    y = base(x) + (m / n - 1) * (x @ W) + (m / n) * s * (x @ A @ B)

which is x @ W' + bias; at initialisation m / n == 1 exactly (both are the same norm of the same weight) and B == 0,
so y is base(x) bit for bit. With the adapters switched off (`disable_adapters`, the base-prediction prior) the
layer is the base layer.
"""
from __future__ import annotations

from typing import Any, List

import paddle
from ppdiffusers.peft.tuners.lora.layer import Linear as LoraLinear

from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.lora import MAGNITUDE, add_lora


def column_norms(weight: paddle.Tensor) -> paddle.Tensor:
    """The L2 norm of each output feature of a Paddle Linear weight ([in, out] -> [out]), computed in float32."""
    return paddle.linalg.norm(weight.astype("float32"), p=2, axis=0)


class DoraLinear(LoraLinear):
    """ppdiffusers' peft LoRA `Linear` with DoRA's forward; `lora_magnitude_vector[adapter]` holds m ([out])."""

    def dora_delta(self, adapter: str) -> paddle.Tensor:
        """s * A @ B in the base weight's [in, out] layout."""
        return (self.lora_A[adapter].weight @ self.lora_B[adapter].weight) * self.scaling[adapter]

    def weight_norm(self, adapter: str) -> paddle.Tensor:
        """||W + s A B|| per output feature, detached (a constant for the backward pass, as in PEFT)."""
        with paddle.no_grad():
            weight = self.get_base_layer().weight
            norm = column_norms(weight + self.dora_delta(adapter).astype(weight.dtype))
        norm.stop_gradient = True
        return norm

    def forward(self, x: paddle.Tensor, *args: Any, **kwargs: Any) -> paddle.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        base = self.get_base_layer()
        result = base(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            magnitude = getattr(self, MAGNITUDE)[adapter]
            scale = (magnitude.astype("float32") / self.weight_norm(adapter)).astype(result.dtype)
            plain = result - base.bias if base.bias is not None else result  # x @ W
            h = x.astype(lora_A.weight.dtype)
            lora = lora_B(lora_A(self.lora_dropout[adapter](h))).astype(result.dtype)
            result = result + (scale - 1) * plain + scale * lora * self.scaling[adapter]
        return result.astype(previous_dtype)

    def __repr__(self) -> str:
        return "dora." + super().__repr__()


def to_dora(layer: paddle.nn.Layer, adapter: str = "default") -> List[str]:
    """Turn every ppdiffusers peft LoRA layer inside `layer` into a `DoraLinear` with its magnitude initialised to the
    base weight's per-output norms (trainable, like A and B); returns the modules converted. Adapters on anything
    but a Linear (`--lora_layers` naming a convolution) are refused: DoRA is written for Linear layers only."""
    from ppdiffusers.peft.tuners.lora.layer import LoraLayer

    converted = []
    for name, sub in layer.named_sublayers():
        if not isinstance(sub, LoraLayer):
            continue
        if type(sub) is not LoraLinear:
            raise ValueError(f"--lora_type dora adapts Linear layers only; {name} is a "
                             f"{type(sub.get_base_layer()).__name__}. Leave it out of --lora_layers, or use "
                             "--lora_type lora.")
        weight = sub.get_base_layer().weight
        norms = column_norms(weight).astype(weight.dtype)
        magnitude = paddle.create_parameter(norms.shape, dtype=norms.dtype,
                                            default_initializer=paddle.nn.initializer.Assign(norms))
        magnitude.stop_gradient = False
        sub.add_sublayer(MAGNITUDE, paddle.nn.ParameterDict({adapter: magnitude}))
        sub.__class__ = DoraLinear
        converted.append(name)
    return converted


def add_dora(layer: paddle.nn.Layer, targets, rank: int, alpha: float, patterns=None) -> None:
    """Freeze `layer` and add trainable DoRA adapters (LoRA's A and B, and a magnitude per output feature) to its
    modules named `targets` (`patterns`: some modules' own (rank, alpha)); a target that is not a Linear is refused
    (ConfigError)."""
    add_lora(layer, targets, rank, alpha, patterns)
    try:
        to_dora(layer)
    except ValueError as e:
        raise ConfigError(str(e)) from None


__all__: List[str] = ["DoraLinear", "add_dora", "column_norms", "to_dora"]
