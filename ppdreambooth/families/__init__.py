"""Model families: everything that differs between Stable Diffusion 1.x/2.x, SDXL and SD3.

A family is a plain, stateless object passed around explicitly (no registry singletons, no
`if family == ...` ladders in shared code). Values that differ are class attributes; code that differs
is a handful of methods:

- `tokenize(tokenizers, prompt)`: the token ids of each tokenizer, as a dict of 1-D int64 arrays.
- `encode_prompt(text_encoders, tokens)`: the conditioning a denoiser reads, as a dict of tensors
  (`prompt_embeds`, and for SDXL `pooled_prompt_embeds`).
- `size_conditioning(original, corner, target)`: extra per-sample conditioning on the image's geometry
  (SDXL's `time_ids`; nothing for SD).
- `predict(denoiser, noisy_latents, timesteps, conditioning)`: one denoiser call.
- `build_pipeline(components, scheduler)`: the inference pipeline (validation, class images, generate).

The family of a model is read from its `model_index.json` (`_class_name`); `--model_family` overrides.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from ppdreambooth.errors import ConfigError
from ppdreambooth.families.checks import read_json_file
from ppdreambooth.families.base import ModelFamily
from ppdreambooth.families.sd import StableDiffusion
from ppdreambooth.families.sd3 import StableDiffusion3
from ppdreambooth.families.sdxl import StableDiffusionXL

FAMILIES: Dict[str, ModelFamily] = {family.name: family for family in
                                    (StableDiffusion(), StableDiffusionXL(), StableDiffusion3())}
BY_PIPELINE_CLASS: Dict[str, ModelFamily] = {f.pipeline_class: f for f in FAMILIES.values()}
# Pipelines whose weights are those of a family we train (img2img/inpaint folders share the components).
BY_PIPELINE_CLASS.update({
    "StableDiffusionImg2ImgPipeline": FAMILIES["sd"],
    "StableDiffusionXLImg2ImgPipeline": FAMILIES["sdxl"],
})


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"--model_family {name!r} is not known; choose one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def read_pipeline_class(path: str, revision: Optional[str] = None) -> Optional[str]:
    """`_class_name` of a model folder's (or hub id's) model_index.json, or None when it cannot be read."""
    index = os.path.join(path, "model_index.json")
    if os.path.isdir(path):
        if not os.path.isfile(index):
            return None
        return read_json_file(index).get("_class_name")
    try:  # a hub id: ppdiffusers fetches model_index.json alone
        from ppdiffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except Exception:  # offline, private, or not a pipeline: the caller says what to do
        return None


def detect_family(path: str, override: Optional[str] = None, revision: Optional[str] = None) -> ModelFamily:
    """The family of the model at `path`: `override` (--model_family) if given, else its pipeline class."""
    if override:
        return get_family(override)
    class_name = read_pipeline_class(path, revision)
    if class_name is None:
        raise ConfigError(
            f"cannot tell which model family {path} is (no readable model_index.json); pass --model_family "
            f"{'|'.join(FAMILIES)}."
        )
    if class_name not in BY_PIPELINE_CLASS:
        raise ConfigError(
            f"{path} is a {class_name}; ppdreambooth trains {', '.join(f.pipeline_class for f in FAMILIES.values())}. "
            "Pass --model_family if this folder holds one of those under another pipeline class."
        )
    return BY_PIPELINE_CLASS[class_name]


__all__ = ["FAMILIES", "ModelFamily", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "detect_family",
           "get_family",
           "read_pipeline_class"]
