"""Put the trained toy-world parts together as an ordinary SD 1.x `StableDiffusionPipeline` folder.

The trainer fine-tunes whatever `StableDiffusionPipeline.from_pretrained` loads, so the folder is exactly what
`save_pretrained` writes: vae/, text_encoder/, tokenizer/, unet/, scheduler/ (a DDPMScheduler with the noise
schedule the UNet was trained under, `clip_sample` set explicitly), model_index.json.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List

from .denoiser import NOISE_SCHEDULE

WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".bin")


def training_scheduler():
    """SD 1.x's DDPMScheduler, epsilon prediction; latents are unbounded, so no clipping of x0."""
    from ppdiffusers import DDPMScheduler

    return DDPMScheduler(clip_sample=False, prediction_type="epsilon", **NOISE_SCHEDULE)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from ppdiffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=training_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def weight_files(folder: str) -> List[str]:
    """Paths, relative to `folder` and sorted, of every weight file in it."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(WEIGHT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_digests(folder: str) -> Dict[str, Dict[str, object]]:
    """{relative path: {"sha256", "bytes"}} of the folder's weight files."""
    return {rel: {"sha256": sha256_of(os.path.join(folder, rel)), "bytes": os.path.getsize(os.path.join(folder, rel))}
            for rel in weight_files(folder)}
