"""The DreamBooth dataset: instance photos (and class images) paired as the paper trains them.

Several subjects (concepts) can train together; their photos arrive as image sets (`data.photos`). Each item holds one instance example and, with prior preservation, one class example; `collate`
concatenates the instance half and the class half so the model runs one forward pass over both.
Random crops and flips draw from a seed that the batch sampler hands out with each index (derived
from the run seed, the epoch and the position), never from a global RNG: a run resumed in a fresh
process sees exactly the augmentations the uninterrupted run saw.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle

from ppdreambooth.batch import (CLASS, INSTANCE, LATENT_CACHED, LATENT_MEAN, LATENT_STD, LOSS_MASK, PIXEL_VALUES,
                                Size)
from ppdreambooth.data.captions import CaptionOptions, caption_plan, vary_caption
from ppdreambooth.data.images import crop_and_scale, crop_box, prepare_image
from ppdreambooth.data.masks import mask_for_crop
from ppdreambooth.data.photos import ImageSet

logger = logging.getLogger(__name__)


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

    `captions` (kohya's caption options) change the instance example's prompt per item, drawing from the item's
    seeded RNG after the crops and flips (those stay as without them); `tokenize` (`DreamBoothModel.tokenize`)
    gives the ids of the empty prompt and of captions that vary. Class examples never change.

    `mask_factor` (the VAE's downsampling; `--masked_loss`) gives every example a `loss_mask` on the latent grid:
    its image's mask under the same crop and flip, or all ones for sets without masks (class images, the
    base-prediction prior half). Masks of crops that never change are computed once and kept.
    """

    def __init__(self, concepts: List[ConceptData], center_crop: bool = False, random_flip: bool = False,
                 size_conditioning: Optional[Callable[[Size, Size, Size], Dict[str, np.ndarray]]] = None,
                 captions: Optional[CaptionOptions] = None,
                 tokenize: Optional[Callable[[str], Dict[str, np.ndarray]]] = None,
                 mask_factor: Optional[int] = None):
        self.concepts, self.center_crop, self.random_flip = concepts, center_crop, random_flip
        self.mask_factor = mask_factor
        self._kept_masks: Dict[tuple, np.ndarray] = {}  # (set, image, size, corner, flip) -> latent-grid mask
        # The family's conditioning on (original size, crop corner, target size), e.g. SDXL's time ids.
        self.size_conditioning = size_conditioning
        self.entries = []
        for c, concept in enumerate(concepts):
            count = len(concept.instance.images) * concept.repeats
            if concept.prior is not None:
                count = max(count, len(concept.prior.images))
            self.entries += [(c, k) for k in range(count)]
        self.captions = captions if captions is not None and captions.active else None
        if self.captions is not None and tokenize is None:
            raise ValueError("caption options need the model's tokenize function")
        self.tokenize = tokenize
        self.empty_tokens = tokenize("") if self.captions is not None and self.captions.dropout_rate > 0 else None
        self.empty_prompt_embeds = None  # the empty prompt's embeddings, set by caching (caption dropout)
        # per concept, per instance image: the caption's tags when shuffling or tag dropout can change it, else None
        self.caption_plans = [[caption_plan(text, c.instance.prompt, self.captions) if self.captions is not None
                               and self.captions.varies else None for text in (c.instance.texts or [])]
                              for c in concepts]
        self._varied_tokens: Dict[str, Dict[str, np.ndarray]] = {}  # caption -> ids, bounded

    @property
    def captions_vary(self) -> bool:
        """True when some instance caption changes from step to step (shuffled tags, tag dropout): its prompt
        embeddings cannot be cached and are encoded at each step."""
        return any(plan is not None for plans in self.caption_plans for plan in plans)

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
        if self.mask_factor is not None:
            example[LOSS_MASK] = self.loss_mask(images, i, size, corner, flip)
        if self.size_conditioning is not None:
            # The corner as seen in the picture trained on: a flip mirrors the left edge (as kohya does).
            left = image.width - corner[1] - size[1] if flip else corner[1]
            example.update(self.size_conditioning(images.original_sizes[i], (corner[0], left), size))
        example.update(images.prompt_embeds[i] if images.prompt_embeds is not None else images.tokens[i])
        return example

    def loss_mask(self, images: ImageSet, i: int, size: Size, corner: Tuple[int, int], flip: bool) -> np.ndarray:
        """float32 (1, h / f, w / f): the image's mask under this crop and flip, area-averaged to the latent grid
        (all ones without a mask). Kept when the crop has no freedom (centre crops, images of the training size),
        as cached latents are; random crops are cut at each step (a crop and a block mean of a small array)."""
        key = (id(images), i, *size, *corner, flip)
        kept = self._kept_masks.get(key)
        if kept is not None:
            return kept
        factor = self.mask_factor
        if images.masks is None:
            mask = np.ones((1, size[0] // factor, size[1] // factor), np.float32)
        else:
            mask = mask_for_crop(images.masks[i], size, corner, flip, factor)
        image = images.images[i]
        if self.center_crop or (image.height, image.width) == tuple(size):
            self._kept_masks[key] = mask
        return mask

    def __getitem__(self, key) -> Dict[str, Dict[str, np.ndarray]]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        mirrored = self.concepts[self.entries[index][0]].prior_mirrors_instance
        examples = []
        for images, i, size in self.parts(index):
            # a mirrored prior half replays the instance's draws: the same crop and flip
            examples.append(self._example(images, i, size, random.Random(seed) if examples and mirrored else rng))
        if self.captions is not None:  # after every crop and flip draw: those stay as without caption options
            self._vary_caption(index, examples[0], rng)
        return {INSTANCE: examples[0], **({CLASS: examples[1]} if len(examples) > 1 else {})}

    def _vary_caption(self, index: int, example: Dict[str, np.ndarray], rng: random.Random) -> None:
        """Apply the caption options to an instance example's prompt: the empty prompt (its cached embeddings when
        prompts are cached) with `dropout_rate`, else, when its tags can change, the ids of one draw of them."""
        images, i, _ = self.parts(index)[0]
        options = self.captions
        cached = images.prompt_embeds is not None
        if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
            empty = self.empty_prompt_embeds if cached else self.empty_tokens
            if empty is None:
                raise RuntimeError("the empty prompt's embeddings were not cached (caching.cache_prompt_embeddings)")
            replacement = empty
        else:
            plans = self.caption_plans[self.entries[index][0]]
            plan = plans[i] if i < len(plans) else None
            if plan is None:
                return
            if cached:
                raise RuntimeError("captions that vary cannot use cached prompt embeddings")
            text = vary_caption(plan, options, rng)
            replacement = self._varied_tokens.get(text)
            if replacement is None:
                replacement = self.tokenize(text)
                if len(self._varied_tokens) < 4096:
                    self._varied_tokens[text] = replacement
        for key in list(images.prompt_embeds[i] if cached else images.tokens[i]):
            example.pop(key, None)
        example.update(replacement)


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
