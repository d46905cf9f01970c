"""Encode once what never changes during training, then stop holding the encoder on the device.

With frozen text encoders the same few prompts give the same embeddings every step: they are computed
once here (with caption dropout the empty prompt too). Captions that change at each step (shuffled tags, tag
dropout) are not cached: the text encoders then stay and encode them at each step. By default (and with
`--cache_latents`) the VAE's latent distribution (mean, std) of every image whose crop is determined is
computed once, for both orientations when `--random_flip` is on; each step still draws its own latent sample
from it, consuming the RNG exactly as encoding on the fly would, so losses match an uncached run.
Images that need a random crop are encoded at each step.
"""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np
import paddle

from ppdreambooth.data.dataset import DreamBoothDataset
from ppdreambooth.data.photos import ImageSet
from ppdreambooth.modeling.model import DreamBoothModel
from ppdreambooth.runtime.host_memory import give_back_freed_memory

logger = logging.getLogger(__name__)


@paddle.no_grad()
def cache_prompt_embeddings(model: DreamBoothModel, dataset: DreamBoothDataset) -> int:
    """Fill `prompt_embeds` of every image set with the text encoders' outputs (the family's
    `prompt_embeds`, and `pooled_prompt_embeds` for SDXL), and with caption dropout the empty prompt's
    (`dataset.empty_prompt_embeds`); returns the number of distinct prompts encoded."""
    if dataset.captions_vary:
        raise ValueError("shuffled or tag-dropped captions vary at each step: their embeddings cannot be cached")
    table: Dict[bytes, Dict[str, np.ndarray]] = {}

    def encoded(tokens):
        key = b"".join(tokens[name].tobytes() for name in sorted(tokens))
        if key not in table:
            output = model.encode_prompts({k: paddle.to_tensor(v[None]) for k, v in tokens.items()})
            table[key] = {k: v[0].astype("float32").numpy() for k, v in output.items()}
        return table[key]

    for image_set in dataset.image_sets:
        image_set.prompt_embeds = [encoded(tokens) for tokens in image_set.tokens]
    if dataset.empty_tokens is not None:  # caption dropout trains some instance rows on the empty prompt
        dataset.empty_prompt_embeds = encoded(dataset.empty_tokens)
    return len(table)


def crop_is_determined(dataset: DreamBoothDataset, images: ImageSet, i: int, size) -> bool:
    """True when image i's training crop at `size` has no freedom: a centre crop (also with buckets), or an
    image that already has exactly the training size once resized (square photos at a square resolution).
    Only then does one cached latent distribution give exactly the losses of encoding on the fly."""
    image = images.images[i]
    return dataset.center_crop or (image.height, image.width) == tuple(size)


def latent_jobs(dataset: DreamBoothDataset) -> dict:
    """Every (image set, image, size, flip) the dataset trains on (both orientations with random flips)."""
    flips = (False, True) if dataset.random_flip else (False,)
    jobs = {}  # in first-use order
    for index in range(len(dataset)):
        for images, i, size in dataset.parts(index):
            for flip in flips:
                jobs.setdefault((id(images), i, size, flip), images)
    return jobs


@paddle.no_grad()
def cache_latents(model: DreamBoothModel, dataset: DreamBoothDataset, batch_size: int = 4) -> int:
    """Fill `latents` of every image set for each (image, training size, orientation) whose crop is
    determined; returns the number of encodings cached. The other images are encoded at each step."""
    jobs = latent_jobs(dataset)
    for images in dataset.image_sets:
        images.latents = {}
    by_size = {}
    for key, images in jobs.items():
        if crop_is_determined(dataset, images, key[1], key[2]):
            by_size.setdefault(key[2], []).append(key)  # one VAE batch holds one size
    for size, group in by_size.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = np.stack([dataset.pixels(jobs[k].images[k[1]], size, k[3]) for k in chunk])
            mean, std = model.latent_moments(paddle.to_tensor(pixels))
            for row, (_, i, (h, w), flip) in enumerate(chunk):
                jobs[chunk[row]].latents[(i, h, w, flip)] = (mean[row].numpy(), std[row].numpy())
    return sum(len(group) for group in by_size.values())


def cache_encodings(model: DreamBoothModel, dataset: DreamBoothDataset, cache_latents_too: bool,
                    keep_encoders: bool, batch_size: int = 4) -> str:
    """Cache what can be cached exactly for this run and release the encoders training no longer needs;
    returns a one-line report of what was cached (for the closing summary).

    Prompt embeddings are cached when no text encoder trains (with pivotal tuning, not while the new tokens train;
    once they freeze the model encodes each distinct prompt once, `DreamBoothModel.memoize_prompts`). With `cache_latents_too` (the default; off with
    --no_cache_latents) the latents of every image whose crop is determined are cached, and the VAE is
    released once nothing is left to encode. `keep_encoders` parks released encoders on the CPU instead of
    dropping them (validation needs them).
    """
    report, notes = [], []
    if dataset.captions_vary:  # every permutation of the tags is a prompt of its own: encode each step
        logger.info("captions vary at each step (--shuffle_caption / --caption_tag_dropout_rate): prompts are "
                    "encoded at each step and the text encoders stay on the training device")
        notes.append("prompts encoded at each step (shuffled or tag-dropped captions; the text encoders stay on "
                     "the device)")
    elif not model.trained_text_encoders() and model.prompts_train():  # pivotal tuning: memoized once frozen
        notes.append("prompts encoded at each step while the new tokens train")
    elif not model.trained_text_encoders():
        prompts = cache_prompt_embeddings(model, dataset)
        for name in reversed(model.family.text_encoders):  # the largest (SD3's T5) first
            if model.has_component(name):
                model.release_frozen(name, keep_on_cpu=keep_encoders)
        logger.info("cached the embeddings of %d prompt(s); the text encoders are off the training device", prompts)
        report.append(f"{prompts} prompt embedding(s)" + (" (the empty prompt's among them, for caption dropout)"
                                                         if dataset.empty_prompt_embeds is not None else ""))
    if cache_latents_too:
        total = len(latent_jobs(dataset))
        encoded = cache_latents(model, dataset, batch_size)
        if encoded == total:
            model.release_frozen("vae", keep_on_cpu=keep_encoders)
            logger.info("cached all %d latent distributions; the VAE is off the training device", encoded)
        else:
            logger.info("cached %d of %d latent distributions (the others need random crops and are encoded at "
                        "each step; --center_crop makes every crop cacheable)", encoded, total)
        report.append(f"latents of {encoded} of {total} image crops" + (" (VAE released)" if encoded == total else ""))
    give_back_freed_memory()  # the released encoders' pages: glibc would keep them (runtime.host_memory)
    return "; ".join(["cached " + (", ".join(report) if report else "nothing"), *notes])

