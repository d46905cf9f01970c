"""Single-file Stable Diffusion checkpoints (the `.safetensors` layout of AUTOMATIC1111's WebUI / ComfyUI).

SD 1.x/2.x layout: `model.diffusion_model.*` (UNet, original LDM names), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (CLIP text encoder), all in PyTorch's tensor layout. SDXL files
(`sd_xl_base_1.0.safetensors`) share the UNet and VAE layout and hold two text encoders under
`conditioner.embedders.0/1` (see `families/keymaps_sdxl.py`).

- `write_single_file` maps a ppdiffusers pipeline folder onto its family's layout (written by hand:
  ppdiffusers only converts the other way).
- `read_single_file` converts such a file into a ppdiffusers pipeline folder, the UNet and VAE with
  ppdiffusers' own LDM converters. A file carries no architecture, tokenizer or scheduler, so those come
  from a model folder or hub id of the same architecture (`--single_file_config`).
"""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from ppdreambooth.errors import ConfigError
from ppdreambooth.families import detect_family
from ppdreambooth.families.loading import load_component
from ppdreambooth.interop.family_formats import formats_of
from ppdreambooth.interop.weights import set_converted_weights


def write_single_file(pipeline_dir: str, path: str, family=None) -> str:
    """One `.safetensors` with the denoiser, VAE and text encoder(s) of a ppdiffusers pipeline folder, in the
    single-file layout of its family (detected from the folder unless given)."""
    from safetensors.numpy import save_file

    family = family or detect_family(pipeline_dir)
    write_state = formats_of(family).single_file_state
    if write_state is None:
        raise ConfigError(f"no single-file layout is known for model family {family.name}.")
    components = {name: load_component(pipeline_dir, name, family)
                  for name in (family.denoiser, "vae", *family.text_encoders)}
    state = write_state(components)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def _check_layout(checkpoint: Dict[str, np.ndarray], path: str, family) -> None:
    """Refuse a file that lacks a part the family's single files hold (e.g. an SD 1.x file with an SDXL config)."""
    required = formats_of(family).single_file_prefixes
    absent = [prefix for prefix in required if not any(k.startswith(prefix) for k in checkpoint)]
    if absent:
        raise ConfigError(f"{path} is not a {family.pipeline_class} single file (it has no {', '.join(absent)} "
                          "weights), yet --single_file_config names one.")


def _read_unet_and_vae(checkpoint: Dict[str, np.ndarray], config_source: str, strict: bool):
    """UNet and VAE (architecture from `config_source`) with the file's LDM/SGM weights, through ppdiffusers'
    own converters (they handle SDXL's `label_emb` and deep transformer blocks too)."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_diffusers_vae_unet_to_ppdiffusers,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_source, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_source, subfolder="vae"))
    unet_config = dict(unet.config)
    if unet_config.get("num_class_embeds") is None:  # the converter tests presence, not value
        unet_config.pop("num_class_embeds", None)
    for model, what, converted in ((unet, "UNet", convert_ldm_unet_checkpoint(checkpoint, unet_config)),
                                   (vae, "VAE", convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))):
        set_converted_weights(model, convert_diffusers_vae_unet_to_ppdiffusers(model, converted), what, strict)
    return unet, vae


def read_single_file(path: str, config_source: str, out_dir: str, family=None) -> str:
    """Convert a single-file checkpoint into a ppdiffusers pipeline folder (architecture, tokenizers and
    scheduler from `config_source`, whose family is detected unless given)."""
    from safetensors.numpy import load_file

    family = family or detect_family(config_source)
    formats = formats_of(family)
    if formats.read_text_encoders is None:
        raise ConfigError(f"no single-file layout is known for model family {family.name}.")
    read_text_encoders, strict = formats.read_text_encoders, formats.strict_single_file
    checkpoint = load_file(path)
    _check_layout(checkpoint, path, family)
    unet, vae = _read_unet_and_vae(checkpoint, config_source, strict)
    components = {"unet": unet, "vae": vae, **read_text_encoders(checkpoint, config_source, family)}
    components.update({name: load_component(config_source, name, family) for name in family.tokenizers})
    pipeline = family.build_pipeline(components, load_component(config_source, "scheduler", family))
    pipeline.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "single_file_source.json"), "w") as f:
        json.dump({"file": os.path.abspath(path), "config": config_source}, f)
    return out_dir
