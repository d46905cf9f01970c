"""The files of a scoring model (DINO, CLIP): a local folder or a hub snapshot, its JSON configs and its weights in
PyTorch's layout (safetensors, or pickled `pytorch_model.bin` read without PyTorch)."""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import numpy as np

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_torch_weights(folder: str) -> Dict[str, np.ndarray]:
    """The weights of a transformers folder, as numpy arrays: model.safetensors, else pytorch_model.bin
    (read without PyTorch, by paddlenlp's reader of its zip/pickle format)."""
    path = os.path.join(folder, WEIGHT_FILES[0])
    if os.path.isfile(path):
        from safetensors.numpy import load_file

        return load_file(path)
    path = os.path.join(folder, WEIGHT_FILES[1])
    if os.path.isfile(path):
        from paddlenlp.utils.serialization import load_torch

        return {k: np.asarray(v) for k, v in load_torch(path).items()}
    raise FileNotFoundError(f"{folder} has no {' or '.join(WEIGHT_FILES)}")


def resolve_model_folder(name_or_path: str, patterns: Sequence[str]) -> str:
    """A local folder as is; a hub id through huggingface_hub's snapshot download (config, preprocessor
    config, and the safetensors weights, else the pickled ones)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    folder = snapshot_download(name_or_path, allow_patterns=[*patterns, WEIGHT_FILES[0]])
    if not os.path.isfile(os.path.join(folder, WEIGHT_FILES[0])):
        folder = snapshot_download(name_or_path, allow_patterns=[*patterns, WEIGHT_FILES[1]])
    return folder


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
