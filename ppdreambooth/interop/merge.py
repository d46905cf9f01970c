"""Fold LoRA adapters into the base weights: a full pipeline folder that loads anywhere, no LoRA loader needed.

`python -m ppdreambooth.export <lora run> --format merged --out <folder>` writes it. Our adapters carry
alpha / rank in lora_B already, so each adapted Linear becomes W + A @ B (Paddle layout: W is [in, out],
A is [in, rank], B is [rank, out]) and computes exactly what the trained model did. This is the way to share
text-encoder and SD3 adapters with people whose ppdiffusers 0.29 cannot load them without its peft backend.
Written here rather than through ppdiffusers' `fuse_lora`: that exists for its SD/SDXL pipelines but not for
`StableDiffusion3Pipeline` in 0.29, and one fold of our own file serves every family alike.

DoRA adapters (a `<module>.lora_magnitude_vector` m beside A and B, `--lora_type dora`) are folded as DoRA computes:
W' = m * (W + A @ B) / ||W + A @ B||, the norm per output feature (axis 0 of Paddle's [in, out] weight). That is
also how `ppdreambooth.generate` and `evaluate` apply a DoRA run (`load_adapters`), since ppdiffusers 0.29 cannot
load DoRA (its loader drops the magnitudes without a word).

LoHa / LoKr adapters (`--lora_type loha|lokr`, keys `<component>.<module>.hada_w1_a` ... / `.lokr_w1` ... in
PyTorch's layout, `modeling.lycoris`) are folded as W + ΔW, ΔW rebuilt by `lycoris_delta` and transposed into
Paddle's [in, out]; ppdiffusers has no loader for them at all, so generate and evaluate fold them too.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np


def adapter_pairs(state: Dict[str, np.ndarray]) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    """(component, module path) -> {"A": down, "B": up} (+ "m": DoRA's magnitude) from peft-named keys
    `<component>.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`."""
    pairs: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        pairs.setdefault((component, module), {})[kind[0]] = value
    return pairs


def dora_weight(weight: np.ndarray, down: np.ndarray, up: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """W' = m * (W + A @ B) / ||W + A @ B|| in Paddle's layout: W [in, out], A [in, r], B [r, out] (alpha / rank
    already in B, as saved), m [out]; the norm is per output feature (axis 0). Computed in float64."""
    merged = weight.astype(np.float64) + down.astype(np.float64) @ up.astype(np.float64)
    return merged * (magnitude.astype(np.float64).reshape(-1) / np.linalg.norm(merged, axis=0))[None, :]


def lycoris_delta(arrays: Dict[str, np.ndarray]) -> np.ndarray:
    """ΔW [out, in (* k * k)] (PyTorch layout, float64) of one module's LoHa or LoKr matrices and `alpha`: LoHa
    (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank; LoKr kron(w1, w2) times alpha / rank when w2 is low rank
    (w2_a @ w2_b), else 1 (the rank is that of the low-rank factor, as LyCORIS and ComfyUI read it)."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    alpha = float(a["alpha"]) if "alpha" in a else None
    if "locon_down" in a:  # LoCon: up [out, r, 1, 1] @ down [r, in, k, k], flattened
        rank = a["locon_down"].shape[0]
        product = a["locon_up"].reshape(-1, rank) @ a["locon_down"].reshape(rank, -1)
        return product * (alpha / rank if alpha is not None else 1.0)
    if "hada_w1_a" in a:
        rank = a["hada_w1_b"].shape[0]
        product = (a["hada_w1_a"] @ a["hada_w1_b"]) * (a["hada_w2_a"] @ a["hada_w2_b"])
        return product * (alpha / rank if alpha is not None else 1.0)
    if "lokr_w2" in a:  # a convolution's full w2 [b, d, k, k] flattened: the same ΔW, [out, in * k * k]
        return np.kron(a["lokr_w1"], a["lokr_w2"].reshape(a["lokr_w2"].shape[0], -1))
    rank = a["lokr_w2_b"].shape[0]
    return np.kron(a["lokr_w1"], a["lokr_w2_a"] @ a["lokr_w2_b"]) * (alpha / rank if alpha is not None else 1.0)


def lycoris_modules(state: Dict[str, np.ndarray]) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    """(component, module path) -> {LyCORIS key: array} from `<component>.<module>.<key>` names."""
    modules: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".", 1)
        modules.setdefault((component, module), {})[kind] = value
    return modules


def fold_lycoris(pipeline, state: Dict[str, np.ndarray], strength: float = 1.0) -> List[str]:
    """W + strength * ΔW for every LoHa/LoKr module of `state` (Linear weights: ΔW.T, Paddle's layout; 3x3
    convolutions, `--conv_rank`: ΔW reshaped to the kernel)."""
    import paddle

    folded, layers = [], {}
    for (component, module), arrays in sorted(lycoris_modules(state).items()):
        if component not in layers:
            layers[component] = dict(getattr(pipeline, component).named_sublayers())
        target = layers[component].get(module)
        if not isinstance(target, (paddle.nn.Linear, paddle.nn.Conv2D)):
            raise ValueError(f"the adapters name {component}.{module}, which is no Linear or Conv2D of the base model")
        weight = target.weight.astype("float32").numpy().astype(np.float64)
        delta = lycoris_delta(arrays)
        # Paddle's Linear weight is [in, out] (ΔW transposed); its Conv2D kernel is PyTorch's [out, in, k, k]
        delta = delta.T if isinstance(target, paddle.nn.Linear) else delta.reshape(weight.shape)
        new = weight + strength * delta
        target.weight.set_value(paddle.to_tensor(new.astype(np.float32), dtype=target.weight.dtype))
        folded.append(f"{component}.{module}")
    return folded


def fold_adapters(pipeline, state: Dict[str, np.ndarray], strength: float = 1.0) -> List[str]:
    """Fold every adapter of `state` into the weight of the Linear it adapts: LoRA adds A @ B, DoRA replaces W by
    W' (above); `strength` s gives W + s * (W_folded - W), as WebUI and ComfyUI apply a LoRA's strength. Returns
    the modules."""
    import paddle

    from ppdreambooth.modeling.lycoris import is_lycoris_state

    if is_lycoris_state(state):
        return fold_lycoris(pipeline, state, strength)
    folded = []
    layers = {}
    for (component, module), pair in sorted(adapter_pairs(state).items()):
        if component not in layers:
            layers[component] = dict(getattr(pipeline, component).named_sublayers())
        linear = layers[component].get(module)
        if linear is None or set(pair) not in ({"A", "B"}, {"A", "B", "m"}):
            raise ValueError(f"the adapters name {component}.{module}, which the base model does not have")
        with paddle.no_grad():
            if "m" not in pair and strength == 1.0:  # plain LoRA: W + A @ B, as it always was
                delta = paddle.to_tensor(pair["A"] @ pair["B"], dtype=linear.weight.dtype)
                linear.weight.set_value(linear.weight + delta)
            else:
                weight = linear.weight.astype("float32").numpy().astype(np.float64)
                target = (dora_weight(weight, pair["A"], pair["B"], pair["m"]) if "m" in pair
                          else weight + pair["A"].astype(np.float64) @ pair["B"].astype(np.float64))
                new = weight + strength * (target - weight)
                linear.weight.set_value(paddle.to_tensor(new.astype(np.float32), dtype=linear.weight.dtype))
        folded.append(f"{component}.{module}")
    return folded


def load_adapters(family, pipeline, lora: str, lora_scale: Optional[float]) -> dict:
    """Put a LoRA run's adapters (`lora`: its folder or the file) into `pipeline`; returns the pipeline options that
    scale them (`lora_scale_options`).

    LoRA goes through ppdiffusers' `load_lora_weights`. LoHa/LoKr are folded (ppdiffusers has no loader for them).
    So is LoRA whose modules have different ranks (`--lora_block_ranks`): under its peft backend, ppdiffusers 0.29
    gives every module the first module's rank as alpha (`get_peft_kwargs`, no alpha in the file), which scales the
    modules of other ranks wrongly.
    DoRA (the file holds `lora_magnitude_vector` keys) cannot be loaded either:
    ppdiffusers 0.29 has no DoRA and its loader drops the magnitudes without a word, so DoRA adapters are folded
    into the weights (`fold_adapters`), `lora_scale` then weighting the change to each weight."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from ppdreambooth.inference.sampling import lora_scale_options
    from ppdreambooth.modeling.lora import (LOCON_WEIGHTS_NAME, LORA_WEIGHTS_NAME, has_mixed_ranks, is_dora_state,
                                            to_peft_keys)
    from ppdreambooth.modeling.lycoris import is_lycoris_state

    path = os.path.join(lora, LORA_WEIGHTS_NAME) if os.path.isdir(lora) else lora
    strength = 1.0 if lora_scale is None else lora_scale
    folding = False
    if os.path.isfile(path) and path.endswith(".safetensors"):
        with safe_open(path, framework="np") as f:
            folding = is_dora_state(f.keys()) or is_lycoris_state(f.keys())
        folding = folding or has_mixed_ranks(path)
    if folding:
        fold_adapters(pipeline, to_peft_keys(load_file(path)), strength)
    else:
        pipeline.load_lora_weights(lora)
    convs = os.path.join(os.path.dirname(path), LOCON_WEIGHTS_NAME)
    if os.path.isfile(convs):  # LoCon: ppdiffusers' loader has no convolution adapters; they are folded
        fold_lycoris(pipeline, load_file(convs), strength)
    return {} if folding else lora_scale_options(family, lora_scale)


def write_merged(lora_state: Dict[str, np.ndarray], base_model: str, family, out: str,
                 conv_state: Optional[Dict[str, np.ndarray]] = None) -> List[str]:
    """The base pipeline with the adapters (and a LoRA run's LoCon `conv_state`) folded in, saved (ppdiffusers
    layout) to `out`; returns its entries."""
    pipeline = family.load_pipeline(base_model)
    fold_adapters(pipeline, lora_state)
    if conv_state:
        fold_lycoris(pipeline, conv_state)
    pipeline.save_pretrained(out)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]
