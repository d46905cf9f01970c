"""A LoRA run's adapters at a smaller rank: per module, the best rank-R approximation of its product A @ B (kohya's
sd-scripts networks/resize_lora.py does the same SVD of the product per module; see `lowrank.resize_factors`).

`python -m ppdreambooth.export <LoRA run> --format lora --rank R --out <folder>` (see `lora_rank`). The written
file keeps the run's components and key layout, so it loads wherever the run's does.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from ppdreambooth.errors import ExportError
from ppdreambooth.interop.lora_extraction import ComponentResult
from ppdreambooth.interop.lowrank import resize_factors
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME, is_dora_state, to_peft_keys


def lora_file(run: str) -> str:
    return os.path.join(run, LORA_WEIGHTS_NAME)


def check_resize(run: str, rank: int) -> int:
    """The run's largest adapter rank, read from the file's header alone; refuses DoRA runs and a `rank` above it."""
    from safetensors import safe_open

    with safe_open(lora_file(run), framework="np") as f:
        keys = list(f.keys())
        if is_dora_state(keys):
            raise ExportError(f"{run} holds DoRA adapters; resizing keeps A @ B only and would change what their "
                              "magnitudes divide by. Resize LoRA runs, or fold the DoRA run with --format merged.")
        # Paddle layout: A (lora_A, or lora.down in a UNet's attention-processor names) is [in, rank]
        ranks = [int(f.get_slice(k).get_shape()[1]) for k in keys
                 if k.endswith((".lora_A.weight", ".lora.down.weight"))]
    if not ranks:
        raise ExportError(f"{lora_file(run)} holds no LoRA adapters (no lora_A / lora.down keys).")
    if rank > max(ranks):
        raise ExportError(f"--rank {rank} is larger than the rank of {run}'s adapters ({max(ranks)}): resizing can "
                          f"only drop directions. Pass --rank {max(ranks)} or less.")
    return max(ranks)


def resize_lora(run: str, rank: int) -> List[ComponentResult]:
    """The run's adapters at rank `rank` (already checked by `check_resize`), per component."""
    from safetensors.numpy import load_file

    from ppdreambooth.interop.merge import adapter_pairs

    state = to_peft_keys(load_file(lora_file(run)))
    results: Dict[str, ComponentResult] = {}
    for (component, module), pair in sorted(adapter_pairs(state).items()):
        part = resize_factors(pair["A"].astype(np.float64), pair["B"].astype(np.float64), rank)
        result = results.setdefault(component, ComponentResult(component))
        result.parts.append(part)
        result.state[f"{module}.lora_A.weight"] = part.down
        result.state[f"{module}.lora_B.weight"] = part.up
    return list(results.values())
