"""LyCORIS adapters (KohakuBlueleaf/LyCORIS): `--lora_type loha` and `--lora_type lokr`.

Each adapted Linear computes with the weight W + ΔW, ΔW built from a few small trained matrices:

- LoHa (low-rank Hadamard product, FedPara): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / rank, with
  w1_a, w2_a [out, rank] and w1_b, w2_b [rank, in]. w2_a starts at zero (as LyCORIS starts it), w1_a ~ N(0, 0.1²),
  w1_b and w2_b ~ N(0, 1).
- LoKr (Kronecker product): ΔW = kron(w1, w2) * scale, out = a * b and in = c * d split by `factorization`
  (`--lokr_factor`), w1 [a, c] and w2 [b, d]; w2 is low rank (w2_a [b, rank] @ w2_b [rank, d]) when
  rank < max(b, d) / 2, as LyCORIS decides, else a full matrix. scale = alpha / rank with a low-rank w2; with a
  full w2 the scale is 1 and alpha is not used (LyCORIS, and ComfyUI reading the file, do the same). w1 starts
  Kaiming-uniform and the zero factor is w2 (full) or w2_b (low rank), so ΔW starts at zero.

The matrices are held in PyTorch's (and LyCORIS's file) layout, ΔW as [out, in]; Paddle's Linear weight is
[in, out], so the forward adds ΔW.T. At initialisation ΔW is exactly zero and the forward is the base Linear's
own `F.linear` on the same weight: the model is its base model bit for bit.

Why written here: ppdiffusers 0.29's peft (a port of an older PEFT) has LoRA only, no LoHa or LoKr.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F

LYCORIS_TYPES = ("loha", "lokr")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n == dimension, as LyCORIS's LoKr does: with `factor` > 0 that
    divides it, (factor, dimension / factor) ordered; otherwise the divisor pair closest to the square root whose
    smaller part does not exceed `factor` (any size with -1). E.g. 128 -> (8, 16); 128, factor 4 -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


def lokr_shapes(out_dim: int, in_dim: int, rank: int, factor: int,
                kernel: Tuple[int, ...] = ()) -> Dict[str, Tuple[int, ...]]:
    """The LoKr matrices of an [out, in, *kernel] weight: lokr_w1 [a, c] and lokr_w2 [b, d, *kernel] or
    lokr_w2_a [b, rank] @ lokr_w2_b [rank, d * kernel size] (2-D, the product ComfyUI computes with `mm`)."""
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    if rank < max(b, d) / 2:
        return {"lokr_w1": (a, c), "lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(kernel))}
    return {"lokr_w1": (a, c), "lokr_w2": (b, d, *kernel)}


class LycorisAdapter(paddle.nn.Layer):
    """A frozen Linear or Conv2D (`base_layer`) plus a LyCORIS ΔW; `enable_adapters(False)` gives the base layer
    alone. For a Conv2D (Paddle's kernel is [out, in, kh, kw], PyTorch's layout) ΔW has the kernel's shape."""

    kind = ""

    def __init__(self, base: paddle.nn.Layer, rank: int, alpha: float, factor: int = -1):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.factor = rank, float(alpha), factor
        self.adapters_on = True
        if isinstance(base, paddle.nn.Conv2D):
            out_dim, in_dim, *kernel = base.weight.shape
        else:
            (in_dim, out_dim), kernel = base.weight.shape, []  # Paddle's Linear: [in, out]
        self.torch_shape = (out_dim, in_dim, *kernel)
        for name, (shape, init) in self.parameter_plan(out_dim, in_dim, tuple(kernel)).items():
            param = self.create_parameter(list(shape), dtype=base.weight.dtype, default_initializer=init)
            param.stop_gradient = False
            setattr(self, name, param)

    def parameter_plan(self, out_dim: int, in_dim: int, kernel: Tuple[int, ...]) -> Dict[str, tuple]:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> paddle.Tensor:
        """ΔW in PyTorch's layout [out, in, *kernel], scale included."""
        return self.flat_delta().reshape(self.torch_shape)

    def flat_delta(self) -> paddle.Tensor:
        """ΔW as [out, in * kernel size]."""
        raise NotImplementedError

    def enable_adapters(self, enabled: bool) -> None:
        self.adapters_on = bool(enabled)

    def forward(self, x: paddle.Tensor, *args, **kwargs) -> paddle.Tensor:
        base = self.base_layer
        if not self.adapters_on:
            return base(x)
        if isinstance(base, paddle.nn.Conv2D):
            weight = base.weight + self.delta().astype(base.weight.dtype)
            return F.conv2d(x, weight, base.bias, stride=base._stride, padding=base._padding,
                            dilation=base._dilation, groups=base._groups, data_format=base._data_format)
        weight = base.weight + self.delta().T.astype(base.weight.dtype)
        return F.linear(x, weight, base.bias)

    def adapter_arrays(self) -> Dict[str, np.ndarray]:
        """The trained matrices (PyTorch layout, float32) and `alpha`, under LyCORIS's names."""
        arrays = {name: p.astype("float32").numpy() for name, p in self.named_parameters(include_sublayers=False)}
        arrays["alpha"] = np.asarray(self.alpha, dtype=np.float32)
        return arrays


def _normal(std: float):
    return paddle.nn.initializer.Normal(0.0, std)


def _kaiming_uniform(fan_in: int):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))`, which LyCORIS uses: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return paddle.nn.initializer.Uniform(-bound, bound)


class LohaAdapter(LycorisAdapter):
    kind = "loha"

    def parameter_plan(self, out_dim, in_dim, kernel):
        r, flat = self.rank, in_dim * math.prod(kernel)
        return {"hada_w1_a": ((out_dim, r), _normal(0.1)), "hada_w1_b": ((r, flat), _normal(1.0)),
                "hada_w2_a": ((out_dim, r), paddle.nn.initializer.Constant(0.0)),
                "hada_w2_b": ((r, flat), _normal(1.0))}

    def flat_delta(self):
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


class LokrAdapter(LycorisAdapter):
    kind = "lokr"

    def parameter_plan(self, out_dim, in_dim, kernel):
        shapes = lokr_shapes(out_dim, in_dim, self.rank, self.factor, kernel)
        zero = paddle.nn.initializer.Constant(0.0)
        plan = {"lokr_w1": (shapes["lokr_w1"], _kaiming_uniform(shapes["lokr_w1"][1]))}
        if "lokr_w2" in shapes:
            plan["lokr_w2"] = (shapes["lokr_w2"], zero)
        else:
            plan["lokr_w2_a"] = (shapes["lokr_w2_a"], _kaiming_uniform(shapes["lokr_w2_a"][1]))
            plan["lokr_w2_b"] = (shapes["lokr_w2_b"], zero)
        return plan

    @property
    def low_rank(self) -> bool:
        return hasattr(self, "lokr_w2_a")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank else 1.0

    def flat_delta(self):
        # kron(w1, w2) of w2 flattened to [b, d * k * k] is kron(w1[:, :, None, None], w2) reshaped: the same ΔW
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2.reshape([self.lokr_w2.shape[0], -1])
        return paddle.kron(self.lokr_w1, w2) * self.scale


class LoconAdapter(LycorisAdapter):
    """LoCon (LoRA on a convolution, kohya's and LyCORIS's): ΔW = up @ down * alpha / rank, `locon_down` a
    [rank, in, k, k] kernel (Kaiming-uniform), `locon_up` a 1x1 [out, rank, 1, 1] kernel (zero at the start);
    written as `lora_down.weight` / `lora_up.weight` in kohya files. `--lora_type lora` with `--conv_rank`."""

    kind = "locon"

    def parameter_plan(self, out_dim, in_dim, kernel):
        r = self.rank
        return {"locon_down": ((r, in_dim, *kernel), _kaiming_uniform(in_dim * math.prod(kernel))),
                "locon_up": ((out_dim, r, 1, 1), paddle.nn.initializer.Constant(0.0))}

    def flat_delta(self):
        down = self.locon_down.reshape([self.rank, -1])
        return self.locon_up.reshape([self.locon_up.shape[0], self.rank]) @ down * self.scale


LAYER_CLASSES = {"loha": LohaAdapter, "lokr": LokrAdapter}
CONV_CLASSES = {"loha": LohaAdapter, "lokr": LokrAdapter, "lora": LoconAdapter}


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for `target_modules` as a list: the module's full name or its dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lycoris(layer: paddle.nn.Layer, targets: Sequence[str], lora_type: str, rank: int, alpha: float,
                factor: int = -1, patterns: Optional[Dict[str, Tuple[int, float]]] = None) -> List[str]:
    """Freeze `layer` and wrap each Linear named by `targets` in a trainable LoHa/LoKr adapter (`patterns`: full
    module name -> its own (rank, alpha), per-block settings); returns the modules adapted. A target that is not a
    Linear, or targets matching nothing, raise ConfigError."""
    from ppdreambooth.errors import ConfigError

    for param in layer.parameters():
        param.stop_gradient = True
    cls = LAYER_CLASSES[lora_type]
    chosen = [(name, sub) for name, sub in layer.named_sublayers() if _matches(name, targets)]
    for name, sub in chosen:
        if type(sub) is not paddle.nn.Linear:
            raise ConfigError(f"--lora_type {lora_type} adapts Linear layers only; {name} is a "
                              f"{type(sub).__name__}. Leave it out of --lora_layers.")
    if not chosen:
        raise ConfigError(f"--lora_layers {','.join(targets)} names no module of {type(layer).__name__}.")
    for name, sub in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_sublayer(parent_name) if parent_name else layer
        module_rank, module_alpha = (patterns or {}).get(name, (rank, alpha))
        parent._sub_layers[child] = cls(sub, module_rank, module_alpha, factor)
    return [name for name, _ in chosen]


CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")  # the UNet's 3x3 convolutions LyCORIS/kohya adapt


def add_lycoris_convs(layer: paddle.nn.Layer, lora_type: str, rank: int, alpha: float, factor: int = -1) -> List[str]:
    """Wrap every 3x3 Conv2D of the UNet's resnets, downsamplers and upsamplers (kohya's LoCon set: conv_in and
    conv_out stay out) in a LoHa/LoKr adapter, or LoCon for `lora_type` lora, of rank `rank` (`--conv_rank`);
    returns the modules adapted."""
    from ppdreambooth.errors import ConfigError

    chosen = [name for name, sub in layer.named_sublayers()
              if type(sub) is paddle.nn.Conv2D and any(b in f".{name}." for b in CONV_BLOCKS)
              and tuple(sub.weight.shape[2:]) != (1, 1) and sub._groups == 1]
    if not chosen:
        raise ConfigError(f"--conv_rank: {type(layer).__name__} has no 3x3 convolutions in resnets or samplers.")
    cls = CONV_CLASSES[lora_type]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_sublayer(parent_name)
        conv = parent._sub_layers[child]
        for param in conv.parameters():
            param.stop_gradient = True
        parent._sub_layers[child] = cls(conv, rank, alpha, factor)
    return chosen


def lycoris_layers(layer: paddle.nn.Layer) -> Dict[str, LycorisAdapter]:
    return {name: sub for name, sub in layer.named_sublayers() if isinstance(sub, LycorisAdapter)}


def lycoris_state_dict(layer: paddle.nn.Layer) -> Dict[str, np.ndarray]:
    """`<module>.<LyCORIS key>` -> array (PyTorch layout) for every adapter in `layer`, `.alpha` included."""
    return {f"{name}.{key}": value for name, sub in lycoris_layers(layer).items()
            for key, value in sub.adapter_arrays().items()}


def is_lycoris_state(keys) -> bool:
    """Whether a saved adapter state (ours or a LyCORIS file) holds LoHa or LoKr matrices."""
    return any(k.rsplit(".", 1)[-1] in LOHA_KEYS + LOKR_KEYS for k in keys)


def lycoris_export_problem(fmt: str, lora_type: str, family_name: str) -> str:
    """Why a LoHa/LoKr run cannot be written in export format `fmt` for this family ("" when it can)."""
    kind = {"loha": "LoHa", "lokr": "LoKr"}[lora_type]
    if fmt == "diffusers":
        return (f"diffusers cannot load {kind} adapters (its load_lora_weights reads LoRA keys only). Use "
                "--format merged (the base pipeline with the adapters folded into its weights, loads anywhere)"
                + ("." if family_name == "sd3" else " or kohya (LyCORIS keys, read by ComfyUI and WebUI)."))
    if fmt == "kohya" and family_name == "sd3":
        return (f"SD3 {kind} adapters have no kohya/LyCORIS export here. Use --format merged (the base pipeline "
                "with the adapters folded into its weights, loads anywhere).")
    return ""


def switch_adapters(layer: paddle.nn.Layer, on: bool) -> None:
    """LyCORIS adapters on or off in every adapted module of `layer` (off: the base model exactly)."""
    for sub in lycoris_layers(layer).values():
        sub.enable_adapters(on)


__all__ = ["LYCORIS_TYPES", "LohaAdapter", "LokrAdapter", "LoconAdapter", "LycorisAdapter", "add_lycoris", "add_lycoris_convs", "factorization",
           "is_lycoris_state", "lokr_shapes", "lycoris_export_problem", "lycoris_state_dict", "switch_adapters"]
