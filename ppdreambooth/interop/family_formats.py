"""What differs between model families in their files outside ppdiffusers: the single-file layout (writer, text-encoder
reader, how strict), kohya's LoRA names, and what a pipeline needs before diffusers reads it. One table, keyed by
family name; `single_file` and `exports` read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ppdreambooth.errors import ConfigError, ExportError
from ppdreambooth.families.loading import load_component
from ppdreambooth.interop.keymaps_ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, sd_kohya_name, unet_to_ldm, vae_to_ldm
from ppdreambooth.interop.keymaps_sdxl import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    kohya_lora_name,
    open_clip_to_hf,
    single_file_state,
    strip_prefix,
)
from ppdreambooth.interop.weights import model_state_in_torch_layout, set_converted_weights


# ----- SD 1.x/2.x ----------------------------------------------------------------------------------------
OPEN_CLIP_SD2_PREFIX = "cond_stage_model.model."  # SD 2.x single files: an OpenCLIP text encoder
SD2_UNSUPPORTED = ("SD 2.x single files hold an OpenCLIP text encoder (`cond_stage_model.model.*`), a layout "
                   "ppdreambooth does not convert; use the diffusers export (--format diffusers) or a model folder.")


def _is_open_clip_text_encoder(text_encoder) -> bool:
    """SD 2.x's text encoder is OpenCLIP ViT-H (GELU), SD 1.x's OpenAI CLIP ViT-L (quick GELU)."""
    return text_encoder.config.hidden_act == "gelu"


def sd_single_file_state(components: Dict[str, object]) -> Dict[str, np.ndarray]:
    """UNet, VAE and text encoder of an SD 1.x pipeline in the WebUI single-file layout (SD 2.x: refused)."""
    if _is_open_clip_text_encoder(components["text_encoder"]):
        raise ConfigError(SD2_UNSUPPORTED)
    unet, vae = components["unet"], components["vae"]
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(model_state_in_torch_layout(unet), dict(unet.config)).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(model_state_in_torch_layout(vae), dict(vae.config)).items()})
    state.update({TEXT_PREFIX + k: v for k, v in model_state_in_torch_layout(components["text_encoder"]).items()})
    return state


def read_sd_text_encoders(checkpoint: Dict[str, np.ndarray], config_source: str, family) -> Dict[str, object]:
    """The CLIP text encoder of an SD 1.x file (`cond_stage_model.transformer.*`, HF names); every weight must
    be there (an SD 2.x file, whose OpenCLIP encoder is elsewhere, is refused rather than loaded half)."""
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_diffusers_vae_unet_to_ppdiffusers


    if any(k.startswith(OPEN_CLIP_SD2_PREFIX) for k in checkpoint):
        raise ConfigError(SD2_UNSUPPORTED)
    text_encoder = load_component(config_source, "text_encoder", family)
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(TEXT_PREFIX)}
    text_state.pop("text_model.embeddings.position_ids", None)
    set_converted_weights(text_encoder, convert_diffusers_vae_unet_to_ppdiffusers(text_encoder, text_state), "text encoder",
                 strict=True)
    return {"text_encoder": text_encoder}


# ----- SDXL -----------------------------------------------------------------------------------------------
def sdxl_single_file_state(components: Dict[str, object]) -> Dict[str, np.ndarray]:
    """UNet, VAE and both text encoders of an SDXL pipeline in the layout of sd_xl_base_1.0.safetensors."""

    unet, vae = components["unet"], components["vae"]
    return single_file_state(model_state_in_torch_layout(unet), dict(unet.config), model_state_in_torch_layout(vae), dict(vae.config),
                             model_state_in_torch_layout(components["text_encoder"]), model_state_in_torch_layout(components["text_encoder_2"]))


def read_sdxl_text_encoders(checkpoint: Dict[str, np.ndarray], config_source: str, family) -> Dict[str, object]:
    """Both text encoders of an SDXL file: CLIP ViT-L under its HF names (`conditioner.embedders.0.transformer.*`)
    and the OpenCLIP text tower (`conditioner.embedders.1.model.*`), renamed by our key map.

    The OpenCLIP names are mapped back by `keymaps_sdxl.open_clip_to_hf` (the inverse of what the writer
    uses) rather than by ppdiffusers' `convert_open_clip_checkpoint`: that one builds its own model from a
    config name and cannot report weights the file lacks, which this reader refuses."""
    import ppdiffusers.transformers as transformers
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_diffusers_vae_unet_to_ppdiffusers


    states = {"text_encoder": strip_prefix(checkpoint, CLIP_PREFIX),
              "text_encoder_2": open_clip_to_hf(strip_prefix(checkpoint, OPEN_CLIP_PREFIX))}
    encoders = {}
    for name, state in states.items():
        config = transformers.CLIPTextConfig.from_pretrained(config_source, subfolder=name)
        model = getattr(transformers, family.text_encoder_classes[name])(config)
        state.pop("text_model.embeddings.position_ids", None)
        set_converted_weights(model, convert_diffusers_vae_unet_to_ppdiffusers(model, state), name, strict=True)
        model.eval()
        encoders[name] = model
    return encoders


# ----- SD3 ------------------------------------------------------------------------------------------------
def fold_sd3_norm_biases(pipeline) -> None:
    """Move the bias of each parameterless SD3 `AdaLayerNormContinuous` norm into its modulation, where diffusers
    keeps it.

    ppdiffusers 0.29 gives these LayerNorms (`elementwise_affine=False`: the transformer's `norm_out` and the last
    block's `norm1_context`) a trainable bias, zero at first, which diffusers' layer (and the original MMDiT) has
    not: diffusers drops it on loading, so a trained one would be lost. The layer computes
    `(norm(x) + b) * (1 + scale) + shift` with `[scale, shift] = W e + c` (`e` = silu of the conditioning). That
    is `norm(x) * (1 + scale) + shift'` with `shift' = shift + b + b * scale`, still linear in `e`: adding
    `b * W_scale` to `W_shift` and `b + b * c_scale` to `c_shift` gives the same output with `b` = 0."""
    import paddle
    from ppdiffusers.models.normalization import AdaLayerNormContinuous

    for name, layer in pipeline.transformer.named_sublayers():
        if not isinstance(layer, AdaLayerNormContinuous) or not isinstance(layer.norm, paddle.nn.LayerNorm):
            continue
        bias = layer.norm.bias
        if layer.norm.weight is not None or bias is None:  # diffusers has the same parameters
            continue
        weight, linear_bias = layer.linear.weight, layer.linear.bias  # Paddle layout: [in, scale | shift]
        if linear_bias is None:
            raise ExportError(f"cannot move the norm bias of {name} into a modulation without a bias.")
        width = bias.shape[0]
        with paddle.no_grad():
            weight.set_value(paddle.concat([weight[:, :width], weight[:, width:] + weight[:, :width] * bias], axis=1))
            linear_bias.set_value(paddle.concat([linear_bias[:width],
                                                 linear_bias[width:] + bias + bias * linear_bias[:width]]))
            bias.set_value(paddle.zeros_like(bias))


@dataclass(frozen=True)
class FamilyFormats:
    single_file_state: Optional[Callable] = None  # components -> single-file state dict (None: not written)
    read_text_encoders: Optional[Callable] = None  # (checkpoint, config source, family) -> text encoders
    strict_single_file: bool = False  # a single file lacking weights is refused, not loaded half
    single_file_prefixes: Tuple[str, ...] = ()  # parts every single file of the family holds
    kohya_name: Optional[Callable[[str, str, dict], str]] = None  # (component, module, UNet config) -> kohya name
    kohya_names_need_unet_config: bool = False  # SDXL: kohya names follow the SGM layout its config determines
    prepare_for_diffusers: Optional[Callable] = None  # in-memory pipeline fix-up before diffusers' layout


FAMILY_FORMATS: Dict[str, FamilyFormats] = {
    "sd": FamilyFormats(sd_single_file_state, read_sd_text_encoders, False, (),
                        lambda component, module, _config: sd_kohya_name(component, module)),
    "sdxl": FamilyFormats(sdxl_single_file_state, read_sdxl_text_encoders, True,
                          (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX), kohya_lora_name, True),
    "sd3": FamilyFormats(prepare_for_diffusers=fold_sd3_norm_biases),
}


def formats_of(family) -> FamilyFormats:
    return FAMILY_FORMATS.get(family.name, FamilyFormats())
