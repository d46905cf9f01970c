"""Generate the prior-preservation class images that `--class_data_dir` still lacks.

Existing images count toward `--num_class_images` and are never touched. New images go into free
slots `class-00000.png`, `class-00001.png`, ...; each is written to a hidden temporary file and renamed,
so a killed run leaves no half-written image and the next run fills exactly the slots still free.
Slot k is always generated with seed `seed + k`, and with several processes rank r takes every
world-th free slot: the work is split, never duplicated, and the images do not depend on the split.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from ppdreambooth.data.images import list_image_files
from ppdreambooth.inference.sampling import generate_images, sampling_pipeline

logger = logging.getLogger(__name__)

SLOT_NAME = "class-{:05d}.png"


def free_slots(class_dir: str, num_class_images: int) -> List[int]:
    """Slot numbers to fill so that `class_dir` holds `num_class_images` usable images."""
    existing = list_image_files(class_dir) if os.path.isdir(class_dir) else []
    missing = num_class_images - len(existing)
    taken = {os.path.basename(p) for p in existing}
    slots, k = [], 0
    while len(slots) < missing:
        if SLOT_NAME.format(k) not in taken:
            slots.append(k)
        k += 1
    return slots


def generate_class_images(
    model_path: str,
    class_dir: str,
    class_prompt: str,
    slots: List[int],
    sample_batch_size: int = 4,
    num_inference_steps: int = 50,
    seed: int = 0,
    revision: Optional[str] = None,
    image_size: Optional[tuple] = None,
    show_progress: bool = True,
    family=None,
) -> int:
    """Generate the images of `slots` (this rank's share of `free_slots`) with the base model's own pipeline
    (`family`'s, detected from `model_path` when not given); returns how many were written.

    With several processes, every rank must take its share of one `free_slots` list computed before any
    rank starts writing (see `ppdreambooth.train.prepare_class_images`).
    """
    os.makedirs(class_dir, exist_ok=True)
    mine = list(slots)
    if not mine:
        return 0
    from tqdm.auto import tqdm

    logger.info("generating %d class images for %r in %s", len(mine), class_prompt, class_dir)
    # the family's deterministic sampler: an image depends on its slot's seed only
    family, pipeline = sampling_pipeline(model_path, family, revision=revision)
    height, width = image_size or (None, None)
    with tqdm(total=len(mine), desc="class images", disable=not show_progress) as progress:
        for start in range(0, len(mine), sample_batch_size):
            slots = mine[start : start + sample_batch_size]
            images = generate_images(pipeline, [class_prompt] * len(slots), [seed + k for k in slots],
                                     num_inference_steps=num_inference_steps, height=height, width=width,
                                     batch_size=len(slots))
            for k, image in zip(slots, images):
                final = os.path.join(class_dir, SLOT_NAME.format(k))
                tmp = os.path.join(class_dir, f".{SLOT_NAME.format(k)}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, final)
            progress.update(len(slots))
    del pipeline
    return len(mine)
