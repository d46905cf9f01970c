"""Encode once what never changes during training, then stop holding the encoder on the device.

With frozen text encoders the same few prompts give the same embeddings every step: they are computed
once here. With `--cache_latents` the VAE's latent distribution (mean, std) of every image is computed
once, for both orientations when `--random_flip` is on; each step still draws its own latent sample from
it, consuming the RNG exactly as encoding on the fly would, so losses match an uncached run.
"""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np
import paddle

from .data import DreamBoothDataset
from .model import DreamBoothModel

logger = logging.getLogger(__name__)


@paddle.no_grad()
def cache_prompt_embeddings(model: DreamBoothModel, dataset: DreamBoothDataset) -> int:
    """Fill `prompt_embeds` of every image set with the text encoders' outputs (the family's
    `prompt_embeds`, and `pooled_prompt_embeds` for SDXL); returns the number of distinct prompts encoded."""
    table: Dict[bytes, Dict[str, np.ndarray]] = {}
    for image_set in dataset.image_sets:
        keys = []
        for tokens in image_set.tokens:
            key = b"".join(tokens[name].tobytes() for name in sorted(tokens))
            if key not in table:
                encoded = model.encode_prompts({k: paddle.to_tensor(v[None]) for k, v in tokens.items()})
                table[key] = {k: v[0].astype("float32").numpy() for k, v in encoded.items()}
            keys.append(key)
        image_set.prompt_embeds = [table[key] for key in keys]
    return len(table)


@paddle.no_grad()
def cache_latents(model: DreamBoothModel, dataset: DreamBoothDataset, batch_size: int = 4) -> int:
    """Fill `latents` of every image set for each (image, training size) the dataset uses, in both
    orientations with random flips; returns the number of encodings."""
    flips = (False, True) if dataset.random_flip else (False,)
    jobs = {}  # (image set, image, size, flip), in first-use order
    for index in range(len(dataset)):
        for images, i, size in dataset.parts(index):
            for flip in flips:
                jobs.setdefault((id(images), i, size, flip), images)
    for images in dataset.image_sets:
        images.latents = {}
    keys = list(jobs)
    by_size = {}
    for key in keys:
        by_size.setdefault(key[2], []).append(key)  # one VAE batch holds one size
    for size, group in by_size.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = np.stack([dataset.pixels(jobs[k].images[k[1]], size, k[3]) for k in chunk])
            mean, std = model.latent_moments(paddle.to_tensor(pixels))
            for row, (_, i, (h, w), flip) in enumerate(chunk):
                jobs[chunk[row]].latents[(i, h, w, flip)] = (mean[row].numpy(), std[row].numpy())
    return len(keys)


def cache_encodings(model: DreamBoothModel, dataset: DreamBoothDataset, cache_latents_too: bool,
                    keep_encoders: bool, batch_size: int = 4) -> None:
    """Cache what can be cached for this run and release the encoders it no longer needs for training.

    `keep_encoders` parks released encoders on the CPU instead of dropping them (validation needs them).
    """
    if not model.model_args.train_text_encoder:
        prompts = cache_prompt_embeddings(model, dataset)
        for name in reversed(model.family.text_encoders):  # the largest (SD3's T5) first
            if model.has_component(name):
                model.release_frozen(name, keep_on_cpu=keep_encoders)
        logger.info("cached the embeddings of %d prompt(s); the text encoders are off the training device", prompts)
    if cache_latents_too:
        encoded = cache_latents(model, dataset, batch_size)
        model.release_frozen("vae", keep_on_cpu=keep_encoders)
        logger.info("cached %d latent distributions; the VAE is off the training device", encoded)
