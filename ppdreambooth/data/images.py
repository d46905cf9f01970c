"""Finding, opening and transforming training images (pure functions, no Paddle).

Real-world photos arrive in every mode PIL knows and with EXIF rotation; `load_rgb` turns each into
an upright 8-bit RGB image and names the file when it cannot. `prepare_image` is the training
transform: resize so the image covers the target, crop (centre or a given random offset), flip, and
scale to [-1, 1] in CHW layout.
"""
from __future__ import annotations

import os
import random
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# About 8k x 8k: far above any training photo, far below what would exhaust memory.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def list_image_files(folder: str) -> List[str]:
    """Image files directly in `folder`, sorted; other files (.txt, .DS_Store, ...) are ignored."""
    names = sorted(
        n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
    )
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit is scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image, apply its EXIF orientation and return it as RGB; ImageError names a bad file."""
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path} is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{path} is {image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; "
                    "downscale it first."
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path} cannot be read as an image ({e}).") from None


def crop_box(
    size: Tuple[int, int], target: Tuple[int, int], center_crop: bool, rng: Optional[random.Random]
) -> Tuple[int, int]:
    """Top-left corner (top, left) of a `target`=(h, w) crop from an image of `size`=(h, w)."""
    extra_h, extra_w = size[0] - target[0], size[1] - target[1]
    if center_crop or rng is None:
        return extra_h // 2, extra_w // 2
    return rng.randint(0, extra_h), rng.randint(0, extra_w)


def resize_to_cover(image: Image.Image, target: Tuple[int, int]) -> Image.Image:
    """Scale `image` (keeping its aspect ratio) to the smallest size that covers `target`=(h, w)."""
    height, width = target
    scale = max(height / image.height, width / image.width)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image if new_size == image.size else image.resize(new_size, resample=Image.BILINEAR)


def crop_and_scale(image: Image.Image, target: Tuple[int, int], corner: Tuple[int, int], flip: bool) -> np.ndarray:
    """Crop `target`=(h, w) at `corner`=(top, left) from an image that covers it, optionally flip; return
    float32 CHW in [-1, 1]."""
    (height, width), (top, left) = target, corner
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return array.transpose(2, 0, 1).copy()


def prepare_image(
    image: Image.Image,
    target: Tuple[int, int],
    center_crop: bool,
    flip: bool,
    rng: Optional[random.Random] = None,
) -> np.ndarray:
    """Resize `image` to cover `target`=(h, w), crop, optionally flip; return float32 CHW in [-1, 1]."""
    image = resize_to_cover(image, target)
    corner = crop_box((image.height, image.width), target, center_crop, rng)
    return crop_and_scale(image, target, corner, flip)
