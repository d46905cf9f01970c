"""Load the Stable Diffusion components from a ppdiffusers folder, a diffusers (PyTorch) folder or a hub id.

A diffusers folder (`unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors`) is
read with ppdiffusers' own PyTorch->Paddle conversion (`from_diffusers=True`). The text encoder is
loaded here rather than through `from_pretrained`: transformers 5 saves CLIPTextModel weights without
the `text_model.` prefix, which ppdiffusers would silently ignore and leave the encoder random. Every
weight the model expects must be in the file, or loading stops and names the missing keys.
"""
from __future__ import annotations

import os
from typing import Optional

from . import compat  # noqa: F401
from .args import ConfigError

PADDLE_WEIGHT_FILES = ("diffusion_paddle_model.safetensors", "diffusion_paddle_model.pdparams",
                       "model.safetensors", "model_state.pdparams")


def is_diffusers_folder(path: str) -> bool:
    """True for a local folder whose UNet is stored in PyTorch's format only."""
    unet = os.path.join(path, "unet")
    if not os.path.isdir(unet):
        return False
    names = set(os.listdir(unet))
    return any(n.startswith("diffusion_pytorch_model") for n in names) and not any(
        n.startswith("diffusion_paddle_model") or n == "model_state.pdparams" for n in names)


def load_torch_text_encoder(path: str):
    """CLIPTextModel from a diffusers/transformers folder holding PyTorch-layout safetensors."""
    from safetensors.numpy import load_file

    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    folder = os.path.join(path, "text_encoder")
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}
    convert_pytorch_state_dict_to_paddle(model, weights)  # transposes Linear weights in place
    expected = {k for k in model.state_dict() if "position_ids" not in k}
    missing = sorted(expected - set(weights))
    if missing:
        raise ConfigError(f"{folder}/model.safetensors lacks {len(missing)} weights of the text encoder, "
                          f"e.g. {', '.join(missing[:3])}.")
    model.set_state_dict(weights)
    model.eval()
    return model


def load_component(path: str, name: str, revision: Optional[str] = None):
    """One of tokenizer, text_encoder, vae, unet, scheduler (the noise scheduler, as DDPM)."""
    from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

    torch_format = os.path.isdir(path) and is_diffusers_folder(path)
    options = {"revision": revision, **({"from_diffusers": True} if torch_format else {})}
    if name == "tokenizer":
        return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    if name == "text_encoder":
        if torch_format:
            return load_torch_text_encoder(path)
        return CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
    if name == "scheduler":
        return DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    model_class = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}[name]
    return model_class.from_pretrained(path, subfolder=name, **options)


def load_components(path: str, revision: Optional[str] = None):
    """(tokenizer, text_encoder, vae, unet, noise_scheduler) of a Stable Diffusion model."""
    return tuple(load_component(path, name, revision) for name in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
