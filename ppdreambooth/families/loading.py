"""Load the components of a model of any family from a ppdiffusers folder, a diffusers (PyTorch) folder or a hub id.

A diffusers folder (`unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors`) is
read with ppdiffusers' own PyTorch->Paddle conversion (`from_diffusers=True`). The text encoder is
loaded here rather than through `from_pretrained`: transformers 5 saves CLIPTextModel weights without
the `text_model.` prefix, which ppdiffusers would silently ignore and leave the encoder random. Every
weight the model expects must be in the file, or loading stops and names the missing keys.
"""
from __future__ import annotations

import os
from typing import Optional

from ppdreambooth.errors import ConfigError
from ppdreambooth.families.checks import damaged_file
from ppdreambooth.families.streamed_load import load_network

LOW_CPU_MEM = {"low_cpu_mem_usage": True}


def as_loaded_stock(model):
    """A ppdiffusers model loaded with LOW_CPU_MEM, its parameters trainable as after the stock load (ppdiffusers
    0.29 leaves them all stop_gradient=True that way); the DreamBoothModel freezes what does not train."""
    for param in model.parameters():
        param.stop_gradient = False
    return model


def is_diffusers_folder(path: str, denoiser: str = "unet") -> bool:
    """True for a local folder whose denoiser is stored in PyTorch's format only."""
    unet = os.path.join(path, denoiser)
    if not os.path.isdir(unet):
        return False
    names = set(os.listdir(unet))
    return any(n.startswith("diffusion_pytorch_model") for n in names) and not any(
        n.startswith("diffusion_paddle_model") or n == "model_state.pdparams" for n in names)


def load_torch_text_encoder(path: str, name: str, class_name: str):
    """A CLIP text encoder (`class_name` of ppdiffusers.transformers) from a diffusers/transformers folder
    holding PyTorch-layout safetensors."""
    from safetensors.numpy import load_file

    import ppdiffusers.transformers as transformers
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle

    folder = os.path.join(path, name)
    model = getattr(transformers, class_name)(transformers.CLIPTextConfig.from_pretrained(folder))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    expected = {k for k in model.state_dict() if "position_ids" not in k}
    weights = {("text_model." + k if k not in expected and "text_model." + k in expected else k): v
               for k, v in weights.items()}
    convert_pytorch_state_dict_to_paddle(model, weights)  # transposes Linear weights in place
    missing = sorted(expected - set(weights))
    if missing:
        raise ConfigError(f"{folder}/model.safetensors lacks {len(missing)} weights of the text encoder, "
                          f"e.g. {', '.join(missing[:3])}.")
    model.set_state_dict(weights)
    model.eval()
    return model


def load_component(path: str, name: str, family, revision: Optional[str] = None):
    """One component of a `family` model by its subfolder name: a tokenizer, a text
    encoder, the vae, the denoiser, or the scheduler (loaded as the DDPM noise scheduler for training).
    A damaged or unreadable file stops with a ConfigError naming the component, not a library traceback."""
    from safetensors import SafetensorError

    try:
        return _load_component(path, name, family, revision)
    except ConfigError:
        raise
    except (SafetensorError, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        damaged = damaged_file(os.path.join(path, name)) if os.path.isdir(os.path.join(path, name)) else None
        what = damaged or f"{type(e).__name__}: {e}"
        raise ConfigError(f"cannot load {name}/ of {path}: {what}. Its files may be damaged or incomplete (an "
                          "interrupted download or copy): fetch the model again.") from None


def _load_component(path: str, name: str, family, revision: Optional[str] = None):
    import ppdiffusers
    import ppdiffusers.transformers as transformers

    torch_format = os.path.isdir(path) and is_diffusers_folder(path, family.denoiser)
    # LOW_CPU_MEM: build the network without weights and take the file's tensors (ppdiffusers' default builds and
    # randomly initialises it first: for SD 1.5's UNet a 10.1 GB peak and 31 s, against 6.9 GB and 5 s)
    options = {"revision": revision, **LOW_CPU_MEM, **({"from_diffusers": True} if torch_format else {})}
    if name in family.tokenizers:
        tokenizer_class = getattr(transformers, family.tokenizer_classes.get(name, "CLIPTokenizer"))
        return tokenizer_class.from_pretrained(path, subfolder=name, **({"revision": revision} if revision else {}))
    if name in family.text_encoders:
        class_name = family.text_encoder_classes[name]
        if torch_format:
            return load_torch_text_encoder(path, name, class_name)
        return getattr(transformers, class_name).from_pretrained(path, subfolder=name, revision=revision,
                                                                 **LOW_CPU_MEM)
    if name == "scheduler":  # the family's training noise schedule (SD, SDXL: DDPM; SD3: flow matching)
        return getattr(ppdiffusers, family.training_scheduler).from_pretrained(path, subfolder="scheduler",
                                                                               revision=revision)
    if name == "vae":
        return as_loaded_stock(load_network(ppdiffusers.AutoencoderKL, path, "vae", options))
    if name == family.denoiser:
        return as_loaded_stock(load_network(getattr(ppdiffusers, family.denoiser_class), path, name, options))
    raise ValueError(f"{name!r} is not a component of a {family.name} model")


def present_components(path: str, family, revision: Optional[str] = None) -> list:
    """The family's components that the model has: optional ones (SD3's T5) only where present."""
    if os.path.isdir(path):
        absent = {n for n in family.optional_components if not os.path.isdir(os.path.join(path, n))}
    else:  # a hub id: its model_index.json lists an absent component as [null, null]
        from ppdiffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=revision)
        absent = {n for n in family.optional_components if not (index.get(n) or [None])[0]}
    return [name for name in family.components if name not in absent]


def load_components(path: str, family, revision: Optional[str] = None, vae_path: Optional[str] = None,
                    skip: tuple = ()) -> dict:
    """The components of a `family` model, by subfolder name (optional ones only when present, none of
    `skip`); `vae_path` replaces the model's VAE (a folder or hub id holding the VAE itself, e.g. an
    fp16-fixed SDXL VAE)."""
    names = [n for n in present_components(path, family, revision) if n != "vae" and n not in skip]
    components = {name: load_component(path, name, family, revision) for name in names}
    if vae_path:
        import ppdiffusers

        components["vae"] = as_loaded_stock(ppdiffusers.AutoencoderKL.from_pretrained(vae_path, **LOW_CPU_MEM))
    else:
        components["vae"] = load_component(path, "vae", family, revision)
    return components
