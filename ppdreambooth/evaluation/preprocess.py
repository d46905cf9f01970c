"""Image preprocessing of the scoring models (DINO, CLIP), as transformers' image processors do it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImagePreprocess:
    """Resize (to a fixed size, or the shortest edge to `shortest_edge`), centre-crop, scale to [0, 1] and
    normalise, as transformers' image processors do. Built from a model's `preprocessor_config.json`."""

    size: Optional[Tuple[int, int]] = None  # (height, width): resize to exactly this
    shortest_edge: Optional[int] = None  # or: resize so that the shorter side is this long
    crop: Optional[Tuple[int, int]] = None  # (height, width) of the centre crop, if any
    resample: int = 2  # PIL code: 2 bilinear, 3 bicubic
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_config(cls, config: dict, defaults: "ImagePreprocess") -> "ImagePreprocess":
        """Read a transformers `preprocessor_config.json` dict; missing entries keep `defaults`."""
        out = ImagePreprocess(**{k: getattr(defaults, k) for k in defaults.__dataclass_fields__})
        if config.get("do_resize", True) and "size" in config:
            size = config["size"]
            if isinstance(size, int):  # ViTFeatureExtractor: both sides; CLIP's old configs: the shortest edge
                if config.get("do_center_crop") or "crop_size" in config:
                    out.size, out.shortest_edge = None, size
                else:
                    out.size, out.shortest_edge = (size, size), None
            elif "shortest_edge" in size:
                out.size, out.shortest_edge = None, int(size["shortest_edge"])
            else:
                out.size, out.shortest_edge = (int(size["height"]), int(size["width"])), None
        if "do_center_crop" in config and not config["do_center_crop"]:
            out.crop = None
        elif "crop_size" in config:
            crop = config["crop_size"]
            out.crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        if "resample" in config:
            out.resample = int(config["resample"])
        if config.get("do_normalize", True):
            out.mean = tuple(config.get("image_mean", out.mean))
            out.std = tuple(config.get("image_std", out.std))
        else:
            out.mean, out.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return out

    def __call__(self, images: Sequence) -> np.ndarray:
        """PIL images -> float32 array [n, 3, height, width]."""
        return np.stack([self.one(image) for image in images])

    def one(self, image) -> np.ndarray:
        image = image.convert("RGB")
        if self.size is not None:
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        elif self.shortest_edge is not None:
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            new = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
            image = image.resize(new, resample=self.resample)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if self.crop is not None:
            height, width = array.shape[:2]
            top, left = max((height - self.crop[0]) // 2, 0), max((width - self.crop[1]) // 2, 0)
            array = array[top:top + self.crop[0], left:left + self.crop[1]]
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return array.transpose(2, 0, 1).astype(np.float32)
