"""Fold LoRA adapters into the base weights: a full pipeline folder that loads anywhere, no LoRA loader needed.

`python -m ppdreambooth.export <lora run> --format merged --out <folder>` writes it. Our adapters carry
alpha / rank in lora_B already, so each adapted Linear becomes W + A @ B (Paddle layout: W is [in, out],
A is [in, rank], B is [rank, out]) and computes exactly what the trained model did. This is the way to share
text-encoder and SD3 adapters with people whose ppdiffusers 0.29 cannot load them without its peft backend.
Written here rather than through ppdiffusers' `fuse_lora`: that exists for its SD/SDXL pipelines but not for
`StableDiffusion3Pipeline` in 0.29, and one fold of our own file serves every family alike.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np


def adapter_pairs(state: Dict[str, np.ndarray]) -> Dict[Tuple[str, str], Dict[str, np.ndarray]]:
    """(component, module path) -> {"A": down, "B": up} from peft-named keys `<component>.<module>.lora_A.weight`."""
    pairs: Dict[Tuple[str, str], Dict[str, np.ndarray]] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        pairs.setdefault((component, module), {})[kind[0]] = value
    return pairs


def fold_adapters(pipeline, state: Dict[str, np.ndarray]) -> List[str]:
    """Add A @ B to the weight of every adapted Linear of the pipeline's components; returns the modules."""
    import paddle

    folded = []
    layers = {}
    for (component, module), pair in sorted(adapter_pairs(state).items()):
        if component not in layers:
            layers[component] = dict(getattr(pipeline, component).named_sublayers())
        linear = layers[component].get(module)
        if linear is None or set(pair) != {"A", "B"}:
            raise ValueError(f"the adapters name {component}.{module}, which the base model does not have")
        delta = paddle.to_tensor(pair["A"] @ pair["B"], dtype=linear.weight.dtype)
        with paddle.no_grad():
            linear.weight.set_value(linear.weight + delta)
        folded.append(f"{component}.{module}")
    return folded


def write_merged(lora_state: Dict[str, np.ndarray], base_model: str, family, out: str) -> List[str]:
    """The base pipeline with the adapters folded in, saved (ppdiffusers layout) to `out`; returns its entries."""
    pipeline = family.load_pipeline(base_model)
    fold_adapters(pipeline, lora_state)
    pipeline.save_pretrained(out)
    return [os.path.join(out, name) for name in sorted(os.listdir(out))]
