"""Single-file Stable Diffusion checkpoints (the `.safetensors` layout of AUTOMATIC1111's WebUI / ComfyUI).

Layout: `model.diffusion_model.*` (UNet, original LDM names), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (CLIP text encoder), all in PyTorch's tensor layout.

- `write_single_file` maps a ppdiffusers pipeline folder onto that layout (written by hand: ppdiffusers
  only converts the other way).
- `read_single_file` converts such a file into a ppdiffusers pipeline folder with ppdiffusers' own LDM
  converters. A file carries no architecture, tokenizer or scheduler, so those come from a model folder
  or hub id of the same architecture (`--single_file_config`).
"""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np

from . import compat  # noqa: F401

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(f".{old}.", f".{new}.")
    return key


def unet_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """diffusers UNet names -> LDM names (SD 1.x/2.x UNet2DConditionModel)."""
    per = config["layers_per_block"] + 1  # resnets per level plus the down/upsampler
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        resnet = "resnets" in parts
        prefix = next((p for p in fixed if key.startswith(p + ".")), None)
        if prefix:
            new = fixed[prefix] + key[len(prefix):]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * per}.0.op.{rest.split('.', 1)[1]}"
            else:
                new = f"input_blocks.{1 + i * per + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                new = f"output_blocks.{i * per + per - 1}.{2 if up_attn[i] else 1}.{rest}"
            else:
                new = f"output_blocks.{i * per + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
        else:
            raise KeyError(f"unexpected UNet weight {key}")
        out[_rename("." + new, RESNET_NAMES)[1:] if resnet else new] = value
    return out


def vae_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """diffusers AutoencoderKL names -> LDM names; attention projections become 1x1 convolutions."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[1] in ("down_blocks", "up_blocks"):
            side, i, kind, j, rest = parts[0], int(parts[2]), parts[3], parts[4], ".".join(parts[5:])
            level = i if side == "encoder" else levels - 1 - i
            group = "down" if side == "encoder" else "up"
            if kind == "resnets":
                new = f"{side}.{group}.{level}.block.{j}.{rest}"
            else:
                new = f"{side}.{group}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{rest}"
        elif parts[1] == "mid_block":
            side, kind, j, rest = parts[0], parts[2], int(parts[3]), ".".join(parts[4:])
            new = f"{side}.mid.{'block_%d' % (j + 1) if kind == 'resnets' else 'attn_1'}.{rest}"
        elif parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{parts[2]}"
        new = _rename("." + new, [("conv_shortcut", "nin_shortcut")])[1:]
        if ".attn_1." in new:
            new = _rename("." + new, VAE_ATTENTION_NAMES)[1:]
            if new.endswith(".weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def _torch_layout(model) -> Dict[str, np.ndarray]:
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_paddle_state_dict_to_pytorch

    state = {k: v.astype("float32").numpy() for k, v in model.state_dict().items()}
    convert_paddle_state_dict_to_pytorch(model, state)  # transposes Linear weights in place
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def write_single_file(pipeline_dir: str, path: str) -> str:
    """One `.safetensors` with UNet, VAE and text encoder of a ppdiffusers pipeline folder."""
    from safetensors.numpy import save_file

    from .loading import load_component

    unet, vae = load_component(pipeline_dir, "unet"), load_component(pipeline_dir, "vae")
    text_encoder = load_component(pipeline_dir, "text_encoder")
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(_torch_layout(unet), dict(unet.config)).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(_torch_layout(vae), dict(vae.config)).items()})
    state.update({TEXT_PREFIX + k: v for k, v in _torch_layout(text_encoder).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def read_single_file(path: str, config_source: str, out_dir: str) -> str:
    """Convert a single-file checkpoint into a ppdiffusers pipeline folder (architecture from `config_source`)."""
    from safetensors.numpy import load_file

    from ppdiffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_diffusers_vae_unet_to_ppdiffusers,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from .loading import load_component

    checkpoint = load_file(path)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_source, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_source, subfolder="vae"))
    text_encoder = load_component(config_source, "text_encoder")
    unet_config = dict(unet.config)
    if unet_config.get("num_class_embeds") is None:  # the converter tests presence, not value
        unet_config.pop("num_class_embeds", None)
    for model, converted in ((unet, convert_ldm_unet_checkpoint(checkpoint, unet_config)),
                             (vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))):
        model.set_state_dict(convert_diffusers_vae_unet_to_ppdiffusers(model, converted))
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(TEXT_PREFIX)}
    text_state.pop("text_model.embeddings.position_ids", None)
    text_encoder.set_state_dict(convert_diffusers_vae_unet_to_ppdiffusers(text_encoder, text_state))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_component(config_source, "tokenizer"), unet=unet,
        scheduler=load_component(config_source, "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "single_file_source.json"), "w") as f:
        json.dump({"file": os.path.abspath(path), "config": config_source}, f)
    return out_dir
