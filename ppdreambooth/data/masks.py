"""Subject masks for `--masked_loss` (kohya's --masked_loss / --alpha_mask, OneTrainer's masked training).

A mask says, per pixel of an instance photo, how much the loss there counts: white (255) fully, black (0) not at
all. It comes from a mask folder (`--instance_mask_dir`, one image per photo named after the photo's stem:
`dog1.jpg` -> `dog1.png`) or from the photo's own alpha channel (`--alpha_mask`), which loading otherwise
composites away. Masks are found and checked with the photos, before any model loads. In training the mask
takes exactly the photo's resize (`photos.load_image_set`), crop and flip (`mask_for_crop`) and is area-averaged
down to the latent grid, where the loss is weighted (`modeling.losses.dreambooth_loss`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from ppdreambooth.data.images import IMAGE_EXTENSIONS, ImageError, MAX_IMAGE_PIXELS
from ppdreambooth.errors import ConfigError

logger = logging.getLogger(__name__)


def mask_file_for(photo_path: str, mask_dir: str) -> Optional[str]:
    """The mask of a photo in `mask_dir`: an image with the photo's stem (`.png` preferred), or None."""
    stem = os.path.splitext(os.path.basename(photo_path))[0]
    for extension in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
        for candidate in (stem + extension, stem + extension.upper()):
            path = os.path.join(mask_dir, candidate)
            if os.path.isfile(path):
                return path
    return None


def _open_upright(path: str) -> Image.Image:
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path} is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{path} is {image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                                 "allowed.")
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path} cannot be read as an image ({e}).") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def alpha_of(path: str) -> Optional[Image.Image]:
    """The alpha channel of an image file as an 8-bit greyscale image (EXIF-rotated like the photo), or None."""
    image = _open_upright(path)
    if not has_alpha(image):
        return None
    return image.convert("RGBA").getchannel("A")


def read_mask_file(path: str) -> Image.Image:
    """A mask file as 8-bit greyscale: its luminance (a mask drawn with transparency: its alpha)."""
    image = _open_upright(path)
    if has_alpha(image) and image.mode != "P":
        alpha = image.convert("RGBA").getchannel("A")
        if np.asarray(alpha).min() < 255:
            return alpha
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def load_masks(photo_paths: Sequence[str], photo_sizes: Sequence[Tuple[int, int]], mask_dir: Optional[str],
               alpha_mask: bool, where: str) -> List[Image.Image]:
    """One greyscale mask per photo ((height, width) given per photo, as decoded and rotated), or ConfigError
    naming every photo without a usable mask and what to do. `where` names the concept in messages."""
    masks, problems = [], []
    for path, (height, width) in zip(photo_paths, photo_sizes):
        try:
            if alpha_mask:
                mask = alpha_of(path)
                if mask is None:
                    problems.append(f"{path} has no alpha channel (save it as a PNG with transparency, or give "
                                    "masks in --instance_mask_dir)")
                    continue
                source = path
            else:
                source = mask_file_for(path, mask_dir)
                if source is None:
                    stem = os.path.splitext(os.path.basename(path))[0]
                    problems.append(f"{path} has no mask: expected {os.path.join(mask_dir, stem + '.png')}")
                    continue
                mask = read_mask_file(source)
        except ImageError as e:
            problems.append(str(e))
            continue
        if (mask.height, mask.width) != (height, width):
            problems.append(f"mask {source} is {mask.width}x{mask.height} but its photo {path} is {width}x{height}: "
                            "a mask must have its photo's size")
            continue
        if not np.asarray(mask).any():
            logger.warning("mask %s is black everywhere: its photo %s only trains with --masked_loss_unmasked_weight",
                           source, path)
        masks.append(mask)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"--masked_loss{where}: {shown}.")
    return masks


def with_masks(photos: Sequence, mask_dir: Optional[str], alpha_mask: bool, where: str = "") -> list:
    """The photos (`photos.Photo`) with their masks attached (`load_masks`; ConfigError names what is missing)."""
    sizes = []
    for photo in photos:
        picture = photo.picture()
        sizes.append((picture.height, picture.width))
    masks = load_masks([p.path for p in photos], sizes, mask_dir, alpha_mask, where)
    return [dataclasses.replace(photo, mask=mask) for photo, mask in zip(photos, masks)]


def area_downsample(weights: np.ndarray, factor: int) -> np.ndarray:
    """Mean over each factor x factor block: (h, w) -> (h / factor, w / factor)."""
    height, width = weights.shape
    if height % factor or width % factor:
        raise ValueError(f"a {width}x{height} mask does not divide into {factor}x{factor} latent cells")
    return weights.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


def mask_for_crop(mask: Image.Image, target: Tuple[int, int], corner: Tuple[int, int], flip: bool,
                  factor: int) -> np.ndarray:
    """float32 (1, h / factor, w / factor) in [0, 1]: the resized mask cropped at `corner` and flipped as the photo
    (`images.crop_and_scale`), then area-averaged to the latent grid."""
    (height, width), (top, left) = target, corner
    crop = mask.crop((left, top, left + width, top + height))
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    weights = np.asarray(crop, dtype=np.float32) / 255.0
    return area_downsample(weights, factor)[None].astype(np.float32)
