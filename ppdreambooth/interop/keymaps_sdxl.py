"""Key maps between diffusers-named SDXL weights and the original (SGM) layout of `sd_xl_base_1.0.safetensors`.

Pure functions over numpy state dicts already in PyTorch's tensor layout (Linear weights [out, in]).
The single file holds four models under four prefixes:

- `model.diffusion_model.*`: the UNet with its LDM/SGM names (`input_blocks`, `middle_block`,
  `output_blocks`, `time_embed`, `label_emb.0.0/0.2` for the added size/pooled-text embedding);
- `first_stage_model.*`: the VAE (the same layout as in SD 1.x files);
- `conditioner.embedders.0.transformer.*`: the first text encoder (CLIP ViT-L) under its HF names;
- `conditioner.embedders.1.model.*`: the second text encoder (OpenCLIP ViT-bigG) under OpenCLIP's own
  names: q, k and v fused into `attn.in_proj_weight/bias`, `ln_1`, `mlp.c_fc`, `positional_embedding`,
  `ln_final`, and `text_projection` stored as [width, projection] (OpenCLIP computes x @ P).

The UNet map is derived from the UNet config, so it serves the real model and the tiny test model alike.
Kohya's sd-scripts trains SDXL on that SGM UNet, so its LoRA names (`lora_unet_input_blocks_4_1_...`)
come from the same map; its text encoder names are the HF ones (`lora_te1_*`, `lora_te2_*`).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from ppdreambooth.interop.keymaps_ldm import UNET_PREFIX, VAE_PREFIX, unet_key_to_ldm, vae_to_ldm

CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# The added embedding (pooled text + size conditioning) of SDXL's UNet.
ADDED_EMBEDDING_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# HF CLIP names -> OpenCLIP names: outside the layers, and inside each layer (q/k/v are fused separately).
OPEN_CLIP_TOP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
HF_LAYERS, OPEN_CLIP_LAYERS = "text_model.encoder.layers.", "transformer.resblocks."
QKV = ("q", "k", "v")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


# ----- UNet ---------------------------------------------------------------------------------------
def unet_key_to_sgm(key: str, config: dict) -> str:
    """One diffusers UNet weight name of an SDXL UNet -> its name in sd_xl_base (without the prefix)."""
    for old, new in ADDED_EMBEDDING_NAMES.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return unet_key_to_ldm(key, config)


def unet_to_sgm(state: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """A diffusers-named SDXL UNet state dict -> sd_xl_base names (without the prefix)."""
    return {unet_key_to_sgm(key, config): value for key, value in state.items()}


def unet_module_to_sgm(module: str, config: dict) -> str:
    """A UNet module path (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`) -> its SGM path."""
    return unet_key_to_sgm(module + ".weight", config)[: -len(".weight")]


# ----- the second text encoder: HF CLIPTextModelWithProjection <-> OpenCLIP -------------------------
def _split_layer_key(key: str):
    """`text_model.encoder.layers.3.mlp.fc1.weight` -> ("3", "mlp.fc1", "weight")."""
    index, rest = key[len(HF_LAYERS):].split(".", 1)
    module, param = rest.rsplit(".", 1)
    return index, module, param


def open_clip_from_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """HF CLIPTextModelWithProjection weights -> OpenCLIP text tower names (without the prefix)."""
    out, fused = {}, {}
    for key, value in state.items():
        if key in OPEN_CLIP_TOP_NAMES:
            out[OPEN_CLIP_TOP_NAMES[key]] = value
        elif key == "text_projection.weight":  # Linear [projection, width] -> OpenCLIP's [width, projection]
            out["text_projection"] = np.ascontiguousarray(value.T)
        elif key.startswith(HF_LAYERS):
            index, module, param = _split_layer_key(key)
            if module in (f"self_attn.{p}_proj" for p in QKV):
                fused.setdefault((index, param), {})[module[len("self_attn.")]] = value
            else:
                out[f"{OPEN_CLIP_LAYERS}{index}.{OPEN_CLIP_LAYER_NAMES[module]}.{param}"] = value
        elif not key.endswith("position_ids"):  # position_ids is a buffer OpenCLIP does not have
            raise KeyError(f"unexpected text encoder weight {key}")
    for (index, param), parts in fused.items():
        out[f"{OPEN_CLIP_LAYERS}{index}.attn.in_proj_{param}"] = np.concatenate([parts[p] for p in QKV], axis=0)
    return out


def open_clip_to_hf(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """OpenCLIP text tower weights (without the prefix) -> HF CLIPTextModelWithProjection names.

    Keys OpenCLIP has but the HF model does not (`logit_scale`, an attention mask buffer) are skipped."""
    top = {v: k for k, v in OPEN_CLIP_TOP_NAMES.items()}
    layer_names = {v: k for k, v in OPEN_CLIP_LAYER_NAMES.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(value.T)
        elif key.startswith(OPEN_CLIP_LAYERS):
            index, rest = key[len(OPEN_CLIP_LAYERS):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module == "attn" and param.startswith("in_proj_"):
                for p, part in zip(QKV, np.split(value, 3, axis=0)):
                    out[f"{HF_LAYERS}{index}.self_attn.{p}_proj.{param[len('in_proj_'):]}"] = part
            else:
                out[f"{HF_LAYERS}{index}.{layer_names[module]}.{param}"] = value
    return out


# ----- the whole file ----------------------------------------------------------------------------------
def single_file_state(unet: Dict[str, np.ndarray], unet_config: dict, vae: Dict[str, np.ndarray], vae_config: dict,
                      text_encoder: Dict[str, np.ndarray], text_encoder_2: Dict[str, np.ndarray]
                      ) -> Dict[str, np.ndarray]:
    """The four models' diffusers/HF-named weights (PyTorch layout) -> one sd_xl_base-layout state dict."""
    state = {UNET_PREFIX + k: v for k, v in unet_to_sgm(unet, unet_config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, vae_config).items()})
    state.update({CLIP_PREFIX + k: v for k, v in text_encoder.items()})
    state.update({OPEN_CLIP_PREFIX + k: v for k, v in open_clip_from_hf(text_encoder_2).items()})
    return state


def strip_prefix(state: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----- kohya LoRA ----------------------------------------------------------------------------------------
def kohya_lora_name(component: str, module: str, unet_config: dict) -> str:
    """The kohya (sd-scripts) SDXL LoRA name of an adapted module: `lora_unet_<SGM path>`,
    `lora_te1_<HF path>`, `lora_te2_<HF path>`, dots replaced by underscores."""
    path = unet_module_to_sgm(module, unet_config) if component == "unet" else module
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


__all__ = ["CLIP_PREFIX", "OPEN_CLIP_PREFIX", "UNET_PREFIX", "VAE_PREFIX", "kohya_lora_name", "open_clip_from_hf",
           "open_clip_to_hf", "single_file_state", "strip_prefix", "unet_key_to_sgm", "unet_module_to_sgm",
           "unet_to_sgm"]
