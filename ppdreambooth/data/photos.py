"""Photo folders into image sets: the usable images of a folder (decoded once, bad files skipped with a warning),
the captions beside them, and each image resized to cover its training size with its prompt's token ids."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ppdreambooth.batch import Size
from ppdreambooth.data.images import ImageError, list_image_files, load_rgb, resize_to_cover
from ppdreambooth.errors import ConfigError

logger = logging.getLogger(__name__)


# Decoded photos kept from the check to their use, at most this many pixels in all (about 600 MB of RGB): a set of
# phone photos is read once; a folder of hundreds of large images is decoded again when used instead of being held.
HELD_PIXELS = 200_000_000


@dataclass(frozen=True)
class Photo:
    """An image file and its decoded picture (None when it was not kept: see HELD_PIXELS)."""

    path: str
    image: object = None  # PIL image, RGB
    mask: object = None  # PIL image, 8-bit greyscale, the photo's size (--masked_loss; see data.masks)

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
    texts: Optional[List[str]] = None  # each image's prompt text (its caption or the prompt): caption options
    prompt: Optional[str] = None  # the set's prompt (the instance prompt), kept whole when captions vary
    masks: Optional[list] = None  # --masked_loss: per image its mask, resized as the image (greyscale PIL)


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
    images, sizes, originals, tokens, texts, masks, cache = [], [], [], [], [], [], {}
    for photo in photos:
        path, image = (photo.path, photo.picture()) if isinstance(photo, Photo) else (photo, load_rgb(photo))
        size = size_of(image.height, image.width)
        if image.height < size[0] or image.width < size[1]:
            logger.warning("%s is %dx%d, smaller than %dx%d: it is upscaled", path, image.width, image.height, size[1], size[0])
        originals.append((image.height, image.width))
        images.append(resize_to_cover(image, size))
        mask = getattr(photo, "mask", None)
        masks.append(None if mask is None else resize_to_cover(mask, size))  # exactly as the photo
        sizes.append(size)
        text = (read_caption(path, caption_extension, prompt) if caption_extension else None) or prompt
        if text not in cache:
            cache[text] = tokenize(text)
        tokens.append(cache[text])
        texts.append(text)
    if any(m is not None for m in masks) and not all(m is not None for m in masks):
        raise ValueError("either every photo of a set has a mask or none has")
    return ImageSet(images=images, sizes=sizes, tokens=tokens, original_sizes=originals, texts=texts, prompt=prompt,
                    masks=masks if masks and masks[0] is not None else None)
