"""The DreamBooth dataset: instance photos (and class images) paired as the paper trains them.

Several subjects (concepts) can train together; captions beside images replace the instance prompt.
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ppdreambooth.batch import CLASS, INSTANCE, LATENT_CACHED, LATENT_MEAN, LATENT_STD, PIXEL_VALUES, Size
from ppdreambooth.errors import ConfigError
from ppdreambooth.data.images import (
    ImageError,
    crop_and_scale,
    crop_box,
    list_image_files,
    load_rgb,
    prepare_image,
    resize_to_cover,
)

logger = logging.getLogger(__name__)


# Decoded photos kept from the check to their use, at most this many pixels in all (about 600 MB of RGB): a set of
# phone photos is read once; a folder of hundreds of large images is decoded again when used instead of being held.
HELD_PIXELS = 200_000_000


@dataclass(frozen=True)
class Photo:
    """An image file and its decoded picture (None when it was not kept: see HELD_PIXELS)."""

    path: str
    image: object = None  # PIL image, RGB

    def picture(self):
        return self.image if self.image is not None else load_rgb(self.path)


def collect_photos(folder: Optional[str], flag: str, allow_empty: bool = False) -> List[Photo]:
    """The usable images of `folder`, decoded (each file is read once per run); unreadable ones are skipped with a
    warning naming them.

    Raises ConfigError (naming `flag` and the folder) when the folder is missing or has no usable image.
    """
    if not folder or not os.path.isdir(folder):
        raise ConfigError(f"--{flag} {folder!r} is not a folder; point it at a folder of images.")
    files, bad, held = [], [], 0
    for path in list_image_files(folder):
        try:
            image = load_rgb(path)
        except ImageError as e:
            bad.append(str(e))
            continue
        held += image.width * image.height
        files.append(Photo(path, image if held <= HELD_PIXELS else None))
    for message in bad:
        logger.warning("skipping %s", message)
    if not files and not allow_empty:
        detail = f" Unreadable: {'; '.join(bad)}" if bad else ""
        raise ConfigError(f"--{flag} {folder} holds no usable image (.jpg, .png, .webp, ...).{detail}")
    return files


@dataclass
class ImageSet:
    """Images of one role (instance or class), each with its training size, original size and prompt tokens.

    `tokens` holds each image's token ids per tokenizer (`input_ids`, `input_ids_2`, ...). `prompt_embeds`
    and `latents` are filled by `ppdreambooth.training.caching` when the text encoders are frozen and when latents
    are cached: then items carry those instead of token ids and pixels.
    """

    images: list  # PIL images, already resized to cover their training size
    sizes: List[Size]  # (height, width) per image: the training size, or its aspect-ratio bucket
    tokens: List[Dict[str, np.ndarray]]
    original_sizes: List[Size] = None  # (height, width) of each file before resizing
    prompt_embeds: Optional[List[Dict[str, np.ndarray]]] = None  # the text encoders' outputs per image
    latents: Optional[Dict[tuple, Tuple[np.ndarray, np.ndarray]]] = None  # (image, h, w, flip) -> (mean, std)


def read_caption(image_path: str, extension: str, instance_prompt: str) -> Optional[str]:
    """The caption file beside an image (`photo.jpg` -> `photo.txt`), with {instance_prompt} filled in."""
    path = os.path.splitext(image_path)[0] + extension
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            caption = " ".join(f.read().split())
    except UnicodeDecodeError:
        raise ConfigError(f"caption file {path} is not UTF-8 text: save it as UTF-8 (or remove it).") from None
    return caption.replace("{instance_prompt}", instance_prompt) if caption else None


def load_image_set(
    photos: Sequence[Union[Photo, str]],
    prompt: str,
    tokenize: Callable[[str], Dict[str, np.ndarray]],
    size_of: Callable[[int, int], Size],
    caption_extension: Optional[str] = None,
) -> ImageSet:
    """Resize photos (or open and resize image files); `size_of(h, w)` gives each one's training size; captions
    override `prompt`.

    `tokenize(text)` gives the token ids of every tokenizer of the model (`DreamBoothModel.tokenize`)."""
    images, sizes, originals, tokens, cache = [], [], [], [], {}
    for photo in photos:
        path, image = (photo.path, photo.picture()) if isinstance(photo, Photo) else (photo, load_rgb(photo))
        size = size_of(image.height, image.width)
        if image.height < size[0] or image.width < size[1]:
            logger.warning("%s is %dx%d, smaller than %dx%d: it is upscaled", path, image.width, image.height, size[1], size[0])
        originals.append((image.height, image.width))
        images.append(resize_to_cover(image, size))
        sizes.append(size)
        text = (read_caption(path, caption_extension, prompt) if caption_extension else None) or prompt
        if text not in cache:
            cache[text] = tokenize(text)
        tokens.append(cache[text])
    return ImageSet(images=images, sizes=sizes, tokens=tokens, original_sizes=originals)


@dataclass
class ConceptData:
    instance: ImageSet
    prior: Optional[ImageSet] = None
    repeats: int = 1
    # `--prior_preservation_mode base_prediction`: the prior half is the instance example itself (same image,
    # crop and flip) under the class prompt; its target comes from the base model, not from class images
    prior_mirrors_instance: bool = False


def mirror_with_prompt(instance: ImageSet, tokens: Dict[str, np.ndarray]) -> ImageSet:
    """The instance images again, every one with the given prompt tokens (the base-prediction prior half)."""
    return ImageSet(images=instance.images, sizes=instance.sizes, tokens=[tokens] * len(instance.images),
                    original_sizes=instance.original_sizes)


class DreamBoothDataset(paddle.io.Dataset):
    """Map-style dataset over all concepts; an item key is `(index, augmentation_seed)` or a plain index.

    Concept c contributes max(instance photos x repeats, class images) entries; its entry k pairs
    instance photo k mod n_instance with class image k mod n_class. An entry's training size is its
    instance photo's (the class image is fitted to it), so one batch can hold both halves.
    """

    def __init__(self, concepts: List[ConceptData], center_crop: bool = False, random_flip: bool = False,
                 size_conditioning: Optional[Callable[[Size, Size, Size], Dict[str, np.ndarray]]] = None):
        self.concepts, self.center_crop, self.random_flip = concepts, center_crop, random_flip
        # The family's conditioning on (original size, crop corner, target size), e.g. SDXL's time ids.
        self.size_conditioning = size_conditioning
        self.entries = []
        for c, concept in enumerate(concepts):
            count = len(concept.instance.images) * concept.repeats
            if concept.prior is not None:
                count = max(count, len(concept.prior.images))
            self.entries += [(c, k) for k in range(count)]

    @property
    def image_sets(self) -> List[ImageSet]:
        sets = [c.instance for c in self.concepts]
        return sets + [c.prior for c in self.concepts if c.prior is not None]

    def __len__(self) -> int:
        return len(self.entries)

    def parts(self, index: int) -> List[Tuple[ImageSet, int, Size]]:
        """(image set, image index, training size) of the instance and (if any) class half of an entry."""
        c, k = self.entries[index]
        concept = self.concepts[c]
        i = k % len(concept.instance.images)
        size = concept.instance.sizes[i]
        parts = [(concept.instance, i, size)]
        if concept.prior is not None:
            parts.append((concept.prior, k % len(concept.prior.images), size))
        return parts

    def size_of_entry(self, index: int) -> Size:
        return self.parts(index)[0][2]

    def pixels(self, image, size: Size, flip: bool, rng: Optional[random.Random] = None) -> np.ndarray:
        return prepare_image(image, size, self.center_crop, flip, rng)

    def _example(self, images: ImageSet, i: int, size: Size, rng: random.Random) -> Dict[str, np.ndarray]:
        flip = self.random_flip and rng.random() < 0.5
        image = images.images[i]
        corner = crop_box((image.height, image.width), size, self.center_crop, rng)
        example = {}
        cached = images.latents.get((i, *size, flip)) if images.latents else None
        if cached is not None:
            example[LATENT_MEAN], example[LATENT_STD] = cached
        else:
            example[PIXEL_VALUES] = crop_and_scale(image, size, corner, flip)
        if self.size_conditioning is not None:
            # The corner as seen in the picture trained on: a flip mirrors the left edge (as kohya does).
            left = image.width - corner[1] - size[1] if flip else corner[1]
            example.update(self.size_conditioning(images.original_sizes[i], (corner[0], left), size))
        example.update(images.prompt_embeds[i] if images.prompt_embeds is not None else images.tokens[i])
        return example

    def __getitem__(self, key) -> Dict[str, Dict[str, np.ndarray]]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        mirrored = self.concepts[self.entries[index][0]].prior_mirrors_instance
        examples = []
        for images, i, size in self.parts(index):
            # a mirrored prior half replays the instance's draws: the same crop and flip
            examples.append(self._example(images, i, size, random.Random(seed) if examples and mirrored else rng))
        return {INSTANCE: examples[0], **({CLASS: examples[1]} if len(examples) > 1 else {})}


def collate_arrays(examples: List[Dict[str, Dict[str, np.ndarray]]]) -> Dict[str, np.ndarray]:
    """Stack a batch: instance examples first, then (with prior preservation) the class examples.

    NumPy arrays, for the training DataLoader: Paddle's reader turns them into tensors in its background
    thread, through pinned memory with an asynchronous copy on a GPU, so the step does not wait for them.
    A batch that mixes cached latents with images still to encode carries both, with `latent_cached`
    saying which rows hold which (the other's entries are zeros); the model encodes only the latter."""
    rows = [e[INSTANCE] for e in examples] + [e[CLASS] for e in examples if CLASS in e]
    cached = [LATENT_MEAN in row for row in rows]
    if any(cached) and not all(cached):
        pixels_shape = next(row[PIXEL_VALUES].shape for row in rows if PIXEL_VALUES in row)
        latent_shape = next(row[LATENT_MEAN].shape for row in rows if LATENT_MEAN in row)
        filler = {PIXEL_VALUES: np.zeros(pixels_shape, np.float32), LATENT_MEAN: np.zeros(latent_shape, np.float32),
                  LATENT_STD: np.zeros(latent_shape, np.float32)}
        rows = [{**filler, **row} for row in rows]
        batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        batch[LATENT_CACHED] = np.asarray(cached)
        return batch
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class SeededBatchSampler(paddle.io.DistributedBatchSampler):
    """Batches that depend only on (seed, epoch), one training size per batch, sharded across ranks.

    Entries are grouped by training size (one group unless aspect-ratio buckets are on), shuffled within
    each group and cut into batches; the batch order is shuffled and every rank takes every n-th batch
    (padded so all ranks get as many). Each index comes with an augmentation seed. Subclassing Paddle's
    DistributedBatchSampler lets PaddleNLP's training loop call `set_epoch` on it; unlike Paddle's
    single-process BatchSampler nothing is drawn from the global NumPy RNG, which makes mid-epoch
    resume exact.
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int, drop_last: bool = False):
        super().__init__(
            dataset, batch_size=batch_size, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=drop_last
        )
        self.seed = seed
        groups: Dict[Size, List[int]] = {}
        for index in range(len(dataset)):
            groups.setdefault(dataset.size_of_entry(index), []).append(index)
        self.groups = [groups[size] for size in sorted(groups)]

    def _epoch_batches(self) -> List[List[Tuple[int, int]]]:
        rng = np.random.RandomState((self.seed * 1_000_003 + self.epoch) % (2**32))
        batches = []
        for members in self.groups:
            order = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = math.ceil(len(batches) / self.nranks)
        batches = [batches[i % len(batches)] for i in range(per_rank * self.nranks)]  # pad: equal share
        seeds = rng.randint(0, 2**31 - 1, size=(len(batches), self.batch_size))
        return [list(zip(b, seeds[n].tolist())) for n, b in enumerate(batches)]

    def __iter__(self):
        yield from self._epoch_batches()[self.local_rank :: self.nranks]

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size for g in self.groups)
        partial = 0 if self.drop_last else sum(1 for g in self.groups if len(g) % self.batch_size)
        return math.ceil((full + partial) / self.nranks)
