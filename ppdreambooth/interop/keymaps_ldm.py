"""Key maps between diffusers-named SD 1.x/2.x weights and the original LDM layout of WebUI / ComfyUI single files.

Pure functions over numpy state dicts already in PyTorch's tensor layout (Linear weights [out, in]). The UNet map
is derived from the UNet config, so it serves the real model and the tiny test model alike; SDXL's SGM layout
(`keymaps_sdxl`) reuses it. kohya's SD 1.x/2.x LoRA names are the diffusers module paths under `lora_unet_` /
`lora_te_`.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(f".{old}.", f".{new}.")
    return key


def unet_key_to_ldm(key: str, config: dict) -> str:
    """One diffusers UNet weight name -> its LDM name (SD 1.x/2.x UNet2DConditionModel layout)."""
    per = config["layers_per_block"] + 1  # resnets per level plus the down/upsampler
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    parts = key.split(".")
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
    return _rename("." + new, RESNET_NAMES)[1:] if "resnets" in parts else new


def unet_to_ldm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """diffusers UNet names -> LDM names (SD 1.x/2.x UNet2DConditionModel)."""
    return {unet_key_to_ldm(key, config): value for key, value in state.items()}


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


def sd_kohya_name(component: str, module: str) -> str:
    """kohya's SD 1.x/2.x LoRA name of an adapted module: its diffusers path under `lora_unet_` / `lora_te_`."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    return prefixes[component] + module.replace(".", "_")
