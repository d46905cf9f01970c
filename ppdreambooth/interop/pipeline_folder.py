"""The final model of a full fine-tune: a ppdiffusers pipeline folder, written to a staging folder first and then
moved into place component by component (the index last), so a kill mid-write never leaves a folder that loads
half-trained weights."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from ppdreambooth.families.loading import is_diffusers_folder, load_component

logger = logging.getLogger(__name__)
STAGING_NAME = ".pipeline-staging"


def write_pipeline(model, base_model: str, out_dir: str, revision: Optional[str] = None,
                   vae: Optional[str] = None) -> None:
    """Save the trained model as a ppdiffusers pipeline folder that `from_pretrained(out_dir)` loads.

    The trained denoiser (and text encoders) come from `model`; the scheduler and any other component
    (feature extractor, safety checker) come from the base model unchanged.
    """
    from ppdiffusers import AutoencoderKL, DiffusionPipeline

    # Under AMP O2 the trained layers are float16/bfloat16; training is over, so cast them back in place:
    # the shared weights are float32 like the base model's.
    for layer in model.children():
        layer.to(dtype="float32")
    # Components the model no longer holds (released after caching) are read again from the base model.
    family = model.family
    held = {}
    # With pivotal tuning the model's tokenizers hold the new tokens, which its encoders' tables do not: the folder
    # gets the base tokenizers, and the tokens are loaded from the embeddings file (`load_textual_inversion`).
    pivotal = getattr(model, "pivotal_tokens", None) is not None
    for name in (family.denoiser, "vae", *family.text_encoders, *family.tokenizers):
        if model.has_component(name) and not (pivotal and name in family.tokenizers):
            held[name] = getattr(model, name)
        elif name == "vae" and vae:  # the replacement VAE trained with (--pretrained_vae_model_name_or_path)
            held[name] = AutoencoderKL.from_pretrained(vae)
        else:
            held[name] = load_component(base_model, name, family, revision)
    options = {"from_diffusers": True} if os.path.isdir(base_model) and is_diffusers_folder(base_model,
                                                                                            family.denoiser) else {}
    pipeline = DiffusionPipeline.from_pretrained(base_model, revision=revision, **options, **held)
    staging = os.path.join(out_dir, STAGING_NAME)
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == "model_index.json"):  # the index goes last
        target, old = os.path.join(out_dir, name), os.path.join(staging, name + ".old")
        if os.path.isdir(target):
            os.replace(target, old)  # a folder cannot be replaced in one step: move the old one aside first
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging)
    logger.info("pipeline written to %s", out_dir)
