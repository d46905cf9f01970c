"""The DreamBooth dataset: instance photos (and class images) paired as the paper trains them.

Each item holds one instance example and, with prior preservation, one class example; `collate`
concatenates the instance half and the class half so the model runs one forward pass over both.
Random crops and flips draw from a seed that the batch sampler hands out with each index (derived
from the run seed, the epoch and the position), never from a global RNG: a run resumed in a fresh
process sees exactly the augmentations the uninterrupted run saw.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from .args import ConfigError
from .images import ImageError, list_image_files, load_rgb, prepare_image, resize_to_cover

logger = logging.getLogger(__name__)


def collect_images(folder: Optional[str], flag: str, allow_empty: bool = False) -> List[str]:
    """Usable image files of `folder`; unreadable ones are skipped with a warning naming them.

    Raises ConfigError (naming `flag` and the folder) when the folder is missing or has no usable image.
    """
    if not folder or not os.path.isdir(folder):
        raise ConfigError(f"--{flag} {folder!r} is not a folder; point it at a folder of images.")
    files, bad = [], []
    for path in list_image_files(folder):
        try:
            load_rgb(path)
            files.append(path)
        except ImageError as e:
            bad.append(str(e))
    for message in bad:
        logger.warning("skipping %s", message)
    if not files and not allow_empty:
        detail = f" Unreadable: {'; '.join(bad)}" if bad else ""
        raise ConfigError(f"--{flag} {folder} holds no usable image (.jpg, .png, .webp, ...).{detail}")
    return files


@dataclass
class ImageSet:
    """Images of one role (instance or class) and, per image, the token ids of its prompt.

    `prompt_embeds` and `latents` are filled by `ppdreambooth.caching` when the text encoder is frozen
    and with `--cache_latents`: then items carry those instead of token ids and pixels.
    """

    images: list  # PIL images, already resized to cover the training size
    input_ids: List[np.ndarray]
    prompt_embeds: Optional[List[np.ndarray]] = None
    latents: Optional[List[Dict[bool, Tuple[np.ndarray, np.ndarray]]]] = None  # per image: flip -> (mean, std)


def load_image_set(paths: Sequence[str], prompt: str, tokenizer, size: Tuple[int, int]) -> ImageSet:
    images = []
    for path in paths:
        image = load_rgb(path)
        if image.height < size[0] or image.width < size[1]:
            logger.warning("%s is %dx%d, smaller than %dx%d: it is upscaled", path, image.width, image.height, size[1], size[0])
        images.append(resize_to_cover(image, size))
    ids = tokenize(tokenizer, prompt)
    return ImageSet(images=images, input_ids=[ids] * len(images))


def tokenize(tokenizer, prompt: str) -> np.ndarray:
    ids = tokenizer(
        prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="np"
    ).input_ids
    return np.asarray(ids[0], dtype=np.int64)


class DreamBoothDataset(paddle.io.Dataset):
    """Map-style dataset; an item key is `(index, augmentation_seed)` or a plain index."""

    def __init__(
        self,
        instance: ImageSet,
        size: Tuple[int, int],
        center_crop: bool = False,
        random_flip: bool = False,
        prior: Optional[ImageSet] = None,
    ):
        self.instance, self.prior = instance, prior
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip

    @property
    def image_sets(self) -> List[ImageSet]:
        return [self.instance] + ([self.prior] if self.prior is not None else [])

    def __len__(self) -> int:
        return max(len(s.images) for s in self.image_sets)

    def pixels(self, image, flip: bool, rng: Optional[random.Random] = None) -> np.ndarray:
        return prepare_image(image, self.size, self.center_crop, flip, rng)

    def _example(self, images: ImageSet, index: int, rng: random.Random) -> Dict[str, np.ndarray]:
        i = index % len(images.images)
        flip = self.random_flip and rng.random() < 0.5
        example = {}
        if images.latents is not None:
            example["latent_mean"], example["latent_std"] = images.latents[i][flip]
        else:
            example["pixel_values"] = self.pixels(images.images[i], flip, rng)
        if images.prompt_embeds is not None:
            example["prompt_embeds"] = images.prompt_embeds[i]
        else:
            example["input_ids"] = images.input_ids[i]
        return example

    def __getitem__(self, key) -> Dict[str, Dict[str, np.ndarray]]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        item = {"instance": self._example(self.instance, index, rng)}
        if self.prior is not None:
            item["class"] = self._example(self.prior, index, rng)
        return item


def collate(examples: List[Dict[str, Dict[str, np.ndarray]]]) -> Dict[str, paddle.Tensor]:
    """Stack a batch: instance examples first, then (with prior preservation) the class examples."""
    rows = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {key: paddle.to_tensor(np.stack([row[key] for row in rows])) for key in rows[0]}


class SeededBatchSampler(paddle.io.DistributedBatchSampler):
    """Shuffles by (seed, epoch), shards across ranks, and pairs each index with an augmentation seed.

    Subclassing Paddle's DistributedBatchSampler lets PaddleNLP's training loop call `set_epoch` on it.
    Unlike Paddle's single-process BatchSampler it draws nothing from the global NumPy RNG, so the order
    of every epoch is a pure function of the seed and epoch, which makes mid-epoch resume exact.
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int, drop_last: bool = False):
        super().__init__(
            dataset, batch_size=batch_size, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=drop_last
        )
        self.seed = seed

    def __iter__(self):
        rng = np.random.RandomState((self.seed * 1_000_003 + self.epoch) % (2**32))
        perm = rng.permutation(len(self.dataset)).tolist()
        order = [perm[i % len(perm)] for i in range(self.total_size)]  # padded: every rank gets the same count
        aug_seeds = rng.randint(0, 2**31 - 1, size=self.total_size).tolist()
        mine = list(range(self.local_rank, self.total_size, self.nranks))
        batch = []
        for position in mine:
            batch.append((order[position], aug_seeds[position]))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)
