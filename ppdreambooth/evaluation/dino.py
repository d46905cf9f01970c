"""DINO ViT-S/16 in Paddle: the subject-fidelity encoder of the DreamBooth paper's DINO metric.

Paddle and ppdiffusers have no DINO model, so this module holds the small Vision Transformer it needs
(the architecture of transformers' `ViTModel`: pre-norm blocks, exact GELU, a CLS token and learned
position embeddings) and loads the published weights of `facebook/dino-vits16` into it. Those weights
are in PyTorch's layout, with the key names transformers' `ViTModel` writes
(`embeddings.cls_token`, `encoder.layer.N.attention.attention.query.weight`, ...); transformers 5's
in-memory names (`layers.N.attention.q_proj.weight`, ...) and a `vit.` prefix are accepted too, a
pooler or classifier head is ignored. Linear weights are transposed to Paddle's [in, out].

    model, preprocess = load_dino("facebook/dino-vits16")   # or a local folder
    features = model.cls_features(preprocess(images))        # [n, 384], the metric's embedding

A DINO embedding is the CLS token of the last layer after the final layer norm, as DreamBench computes it.
`--dino_model` takes a local folder (config.json + model.safetensors or pytorch_model.bin, optionally
preprocessor_config.json) or a hub id, fetched with huggingface_hub's snapshot download.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

import numpy as np

from ppdreambooth.evaluation.model_files import read_json, read_torch_weights, resolve_model_folder
from ppdreambooth.evaluation.preprocess import ImagePreprocess
from ppdreambooth.evaluation.vit import ViTConfig, build_vit

DEFAULT_DINO_MODEL = "facebook/dino-vits16"


# transformers 5's in-memory names -> the published checkpoint's names
_V5_NAMES = [
    (r"^layers\.", "encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
_IGNORED = ("pooler.", "classifier.", "head.")


def published_key(key: str) -> Optional[str]:
    """The checkpoint key a weight name stands for, or None for weights the metric does not use."""
    if key.startswith("vit."):
        key = key[len("vit."):]
    if key.startswith(_IGNORED) or "position_ids" in key:
        return None
    for pattern, replacement in _V5_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def load_vit_weights(model, weights: Dict[str, np.ndarray]) -> None:
    """Put PyTorch-layout ViT weights into `model`; every parameter must be there, with its shape."""
    import paddle.nn as nn

    linear = {name + ".weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    expected = model.state_dict()
    state = {}
    for key, value in weights.items():
        name = published_key(key)
        if name is None:
            continue
        value = np.asarray(value, dtype=np.float32)
        if name in linear:
            value = value.T
        state[name] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the ViT weights lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"the ViT weights have tensors this ViT does not, e.g. {', '.join(unknown[:3])}")
    for name, value in state.items():
        if tuple(expected[name].shape) != value.shape:
            raise ValueError(f"{name}: shape {value.shape} in the file, {tuple(expected[name].shape)} in the model")
    model.set_state_dict(state)


def load_dino(name_or_path: str = DEFAULT_DINO_MODEL):
    """(model, preprocess) for a DINO ViT folder or hub id."""
    folder = resolve_model_folder(name_or_path, ["config.json", "preprocessor_config.json"])
    config = ViTConfig.from_dict(read_json(os.path.join(folder, "config.json")))
    model = build_vit(config)
    load_vit_weights(model, read_torch_weights(folder))
    defaults = ImagePreprocess(size=(config.image_size, config.image_size), resample=2)
    preprocess = ImagePreprocess.from_config(read_json(os.path.join(folder, "preprocessor_config.json")), defaults)
    return model, preprocess
