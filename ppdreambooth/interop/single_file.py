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


def _torch_layout(model) -> Dict[str, np.ndarray]:
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_paddle_state_dict_to_pytorch

    state = {k: v.astype("float32").numpy() for k, v in model.state_dict().items()}
    convert_paddle_state_dict_to_pytorch(model, state)  # transposes Linear weights in place
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


OPEN_CLIP_SD2_PREFIX = "cond_stage_model.model."  # SD 2.x single files: an OpenCLIP text encoder
SD2_UNSUPPORTED = ("SD 2.x single files hold an OpenCLIP text encoder (`cond_stage_model.model.*`), a layout "
                   "ppdreambooth does not convert; use the diffusers export (--format diffusers) or a model folder.")


def _is_open_clip_text_encoder(text_encoder) -> bool:
    """SD 2.x's text encoder is OpenCLIP ViT-H (GELU), SD 1.x's OpenAI CLIP ViT-L (quick GELU)."""
    return text_encoder.config.hidden_act == "gelu"


def _sd_single_file_state(components: Dict[str, object]) -> Dict[str, np.ndarray]:
    """UNet, VAE and text encoder of an SD 1.x pipeline in the WebUI single-file layout (SD 2.x: refused)."""
    from ppdreambooth.errors import ConfigError

    if _is_open_clip_text_encoder(components["text_encoder"]):
        raise ConfigError(SD2_UNSUPPORTED)
    unet, vae = components["unet"], components["vae"]
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(_torch_layout(unet), dict(unet.config)).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(_torch_layout(vae), dict(vae.config)).items()})
    state.update({TEXT_PREFIX + k: v for k, v in _torch_layout(components["text_encoder"]).items()})
    return state


def _sdxl_single_file_state(components: Dict[str, object]) -> Dict[str, np.ndarray]:
    """UNet, VAE and both text encoders of an SDXL pipeline in the layout of sd_xl_base_1.0.safetensors."""
    from ppdreambooth.interop.keymaps_sdxl import single_file_state

    unet, vae = components["unet"], components["vae"]
    return single_file_state(_torch_layout(unet), dict(unet.config), _torch_layout(vae), dict(vae.config),
                             _torch_layout(components["text_encoder"]), _torch_layout(components["text_encoder_2"]))


SINGLE_FILE_WRITERS = {"sd": _sd_single_file_state, "sdxl": _sdxl_single_file_state}


def write_single_file(pipeline_dir: str, path: str, family=None) -> str:
    """One `.safetensors` with the denoiser, VAE and text encoder(s) of a ppdiffusers pipeline folder, in the
    single-file layout of its family (detected from the folder unless given)."""
    from safetensors.numpy import save_file

    from ppdreambooth.errors import ConfigError
    from ppdreambooth.families import detect_family
    from ppdreambooth.families.loading import load_component

    family = family or detect_family(pipeline_dir)
    if family.name not in SINGLE_FILE_WRITERS:
        raise ConfigError(f"no single-file layout is known for model family {family.name}.")
    components = {name: load_component(pipeline_dir, name, family=family)
                  for name in (family.denoiser, "vae", *family.text_encoders)}
    state = SINGLE_FILE_WRITERS[family.name](components)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def _set_weights(model, state: Dict[str, np.ndarray], what: str, strict: bool) -> None:
    """Load converted weights (Paddle layout) into `model`; with `strict`, stop when the file lacked any."""
    from ppdreambooth.errors import ConfigError

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(k for k in expected if k not in state)
    if strict and missing:
        raise ConfigError(f"the single file lacks {len(missing)} weights of the {what}, e.g. "
                          f"{', '.join(missing[:3])}; is --single_file_config the same architecture?")
    # Paddle skips a weight of another shape with a warning only: that would leave it at its initial value
    misshapen = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if strict and misshapen:
        raise ConfigError(f"{len(misshapen)} weights of the {what} in the single file have other shapes than "
                          f"--single_file_config describes, e.g. {misshapen[0]} {tuple(state[misshapen[0]].shape)} "
                          f"vs {expected[misshapen[0]]}: is it the same architecture?")
    model.set_state_dict(state)


def _check_layout(checkpoint: Dict[str, np.ndarray], path: str, family) -> None:
    """Refuse a file that lacks a part the family's single files hold (e.g. an SD 1.x file with an SDXL config)."""
    from ppdreambooth.errors import ConfigError
    from ppdreambooth.interop.keymaps_sdxl import CLIP_PREFIX, OPEN_CLIP_PREFIX

    required = {"sdxl": (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)}.get(family.name, ())
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
        _set_weights(model, convert_diffusers_vae_unet_to_ppdiffusers(model, converted), what, strict)
    return unet, vae


def _read_sd_text_encoders(checkpoint: Dict[str, np.ndarray], config_source: str, family) -> Dict[str, object]:
    """The CLIP text encoder of an SD 1.x file (`cond_stage_model.transformer.*`, HF names); every weight must
    be there (an SD 2.x file, whose OpenCLIP encoder is elsewhere, is refused rather than loaded half)."""
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_diffusers_vae_unet_to_ppdiffusers

    from ppdreambooth.errors import ConfigError
    from ppdreambooth.families.loading import load_component

    if any(k.startswith(OPEN_CLIP_SD2_PREFIX) for k in checkpoint):
        raise ConfigError(SD2_UNSUPPORTED)
    text_encoder = load_component(config_source, "text_encoder")
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(TEXT_PREFIX)}
    text_state.pop("text_model.embeddings.position_ids", None)
    _set_weights(text_encoder, convert_diffusers_vae_unet_to_ppdiffusers(text_encoder, text_state), "text encoder",
                 strict=True)
    return {"text_encoder": text_encoder}


def _read_sdxl_text_encoders(checkpoint: Dict[str, np.ndarray], config_source: str, family) -> Dict[str, object]:
    """Both text encoders of an SDXL file: CLIP ViT-L under its HF names (`conditioner.embedders.0.transformer.*`)
    and the OpenCLIP text tower (`conditioner.embedders.1.model.*`), renamed by our key map.

    The OpenCLIP names are mapped back by `keymaps_sdxl.open_clip_to_hf` (the inverse of what the writer
    uses) rather than by ppdiffusers' `convert_open_clip_checkpoint`: that one builds its own model from a
    config name and cannot report weights the file lacks, which this reader refuses."""
    import ppdiffusers.transformers as transformers
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_diffusers_vae_unet_to_ppdiffusers

    from ppdreambooth.interop.keymaps_sdxl import CLIP_PREFIX, OPEN_CLIP_PREFIX, open_clip_to_hf, strip_prefix

    states = {"text_encoder": strip_prefix(checkpoint, CLIP_PREFIX),
              "text_encoder_2": open_clip_to_hf(strip_prefix(checkpoint, OPEN_CLIP_PREFIX))}
    encoders = {}
    for name, state in states.items():
        config = transformers.CLIPTextConfig.from_pretrained(config_source, subfolder=name)
        model = getattr(transformers, family.text_encoder_classes[name])(config)
        state.pop("text_model.embeddings.position_ids", None)
        _set_weights(model, convert_diffusers_vae_unet_to_ppdiffusers(model, state), name, strict=True)
        model.eval()
        encoders[name] = model
    return encoders


# family -> (reader of its text encoders, whether a file lacking weights is refused)
SINGLE_FILE_READERS = {"sd": (_read_sd_text_encoders, False), "sdxl": (_read_sdxl_text_encoders, True)}


def read_single_file(path: str, config_source: str, out_dir: str, family=None) -> str:
    """Convert a single-file checkpoint into a ppdiffusers pipeline folder (architecture, tokenizers and
    scheduler from `config_source`, whose family is detected unless given)."""
    from safetensors.numpy import load_file

    from ppdreambooth.errors import ConfigError
    from ppdreambooth.families import detect_family
    from ppdreambooth.families.loading import load_component

    family = family or detect_family(config_source)
    if family.name not in SINGLE_FILE_READERS:
        raise ConfigError(f"no single-file layout is known for model family {family.name}.")
    read_text_encoders, strict = SINGLE_FILE_READERS[family.name]
    checkpoint = load_file(path)
    _check_layout(checkpoint, path, family)
    unet, vae = _read_unet_and_vae(checkpoint, config_source, strict)
    components = {"unet": unet, "vae": vae, **read_text_encoders(checkpoint, config_source, family)}
    components.update({name: load_component(config_source, name, family=family) for name in family.tokenizers})
    pipeline = family.build_pipeline(components, load_component(config_source, "scheduler"))
    pipeline.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "single_file_source.json"), "w") as f:
        json.dump({"file": os.path.abspath(path), "config": config_source}, f)
    return out_dir
