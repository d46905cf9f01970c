"""`ModelFamily`: the values and the few methods in which model families differ (see `families/__init__`)."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ppdreambooth.batch import Size, token_key



logger = logging.getLogger("ppdreambooth")
_warned = set()  # (tokenizer, prompt) pairs already reported


def warn_if_cut(tokenizer, name: str, prompt: str) -> None:
    """Say once when a prompt is longer than a tokenizer's window: the encoder sees only its beginning."""
    length = len(tokenizer(prompt).input_ids)
    if length > tokenizer.model_max_length and (name, prompt) not in _warned:
        _warned.add((name, prompt))
        logger.warning("the prompt %r is %d tokens long; %s reads %d, so its end is cut off", prompt, length, name,
                       tokenizer.model_max_length)


class ModelFamily:
    name: str = ""
    pipeline_class: str = ""  # ppdiffusers pipeline class: detection, validation, class images, generate
    denoiser: str = "unet"  # subfolder and pipeline attribute of the trained network
    denoiser_class: str = "UNet2DConditionModel"
    tokenizers: Tuple[str, ...] = ("tokenizer",)
    text_encoders: Tuple[str, ...] = ("text_encoder",)  # subfolders, in pipeline order
    text_encoder_classes: Dict[str, str] = {"text_encoder": "CLIPTextModel"}  # in ppdiffusers.transformers
    tokenizer_classes: Dict[str, str] = {}  # subfolder -> class in ppdiffusers.transformers (default CLIPTokenizer)
    optional_components: Tuple[str, ...] = ()  # may be absent from a model folder (SD3's T5)
    trainable_text_encoders: Optional[Tuple[str, ...]] = None  # what --train_text_encoder trains (None: all)
    training_scheduler: str = "DDPMScheduler"  # noise schedule the objective reads, from the scheduler folder
    sampling_scheduler: str = "DPMSolverMultistepScheduler"  # validation, class images, generate's default
    lora_scale_kwarg: str = "cross_attention_kwargs"  # how a pipeline call passes the LoRA scale
    resolution_multiple: int = 8  # image sides must be multiples of this (VAE factor x patch size)
    objective: str = "diffusion"  # see ppdreambooth.modeling.objectives
    pipeline_extras: Dict[str, object] = {}  # extra constructor arguments of the pipeline
    # LoRA targets: module names adapted in the denoiser and in each text encoder
    denoiser_lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_lora_targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # what the --lora_layers / --text_encoder_lora_layers presets add (ppdreambooth.modeling.lora_targets): the
    # feed-forward Linears of a transformer block (attn_ff), where the transformer blocks are (all_linear: every
    # Linear in a module whose name this matches), CLIP's MLP (attn_mlp)
    denoiser_ff_targets: Tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
    denoiser_block_pattern: str = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
    text_encoder_mlp_targets: Tuple[str, ...] = ("mlp.fc1", "mlp.fc2")
    lora_blocks_numbered: bool = False  # --lora_block_*: down/mid/up (UNets) or numbered joint blocks (SD3)
    # denoiser adapters saved with attention-processor names, which ppdiffusers 0.29 loads without its peft
    # backend too (UNets); False: peft names, loadable only under that backend (SD3's transformer)
    legacy_lora_keys: bool = True
    # what the family cannot do (yet): option -> the message that says so and what to do instead
    unsupported_options: Dict[str, str] = {}
    card_tag: str = ""  # the model card's tag
    # pivotal tuning: CLIP encoder subfolder -> its key in a textual-inversion file (diffusers' advanced scripts)
    textual_inversion_keys: Dict[str, str] = {"text_encoder": "clip_l"}
    textual_inversion_loader: bool = True  # the pipeline has `load_textual_inversion` (not SD3's in 0.29)

    @property
    def components(self) -> Tuple[str, ...]:
        """Subfolders a model folder of this family has (some may be optional)."""
        return (self.denoiser, "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    @property
    def required_components(self) -> Tuple[str, ...]:
        return tuple(c for c in self.components if c not in self.optional_components)

    def is_trainable_text_encoder(self, name: str) -> bool:
        return self.trainable_text_encoders is None or name in self.trainable_text_encoders

    # ----- prompts ------------------------------------------------------------------------------
    def tokenize(self, tokenizers: Dict[str, object], prompt: str) -> Dict[str, np.ndarray]:
        """Token ids of `prompt` from each tokenizer, padded to its length: {"input_ids", "input_ids_2", ...}."""
        out = {}
        for n, name in enumerate(self.tokenizers):
            tokenizer = tokenizers.get(name)
            if tokenizer is None:  # an optional tokenizer the model does without (SD3's T5)
                continue
            ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="np").input_ids
            warn_if_cut(tokenizer, name, prompt)
            out[token_key(n)] = np.asarray(ids[0], dtype=np.int64)
        return out

    def encode_prompt(self, text_encoders: Dict[str, object], tokens: Dict[str, object],
                      denoiser_config=None) -> Dict[str, object]:
        """The conditioning for token ids; `denoiser_config` gives widths where an encoder is absent (SD3)."""
        raise NotImplementedError

    # ----- the denoiser ---------------------------------------------------------------------------
    def size_conditioning(self, original: Size, corner: Size, target: Size) -> Dict[str, np.ndarray]:
        """Per-sample conditioning on the image geometry (batch key -> value); empty when the family has none."""
        return {}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning: Dict[str, object]):
        raise NotImplementedError

    def enable_recompute(self, denoiser) -> None:
        """Gradient checkpointing in the denoiser (ppdiffusers' own switch, where it works)."""
        denoiser.enable_gradient_checkpointing()

    def freeze_unused(self, denoiser) -> None:
        """Freeze parameters the training forward never uses (data parallel needs every trained one used)."""

    # ----- inference ------------------------------------------------------------------------------
    def build_pipeline(self, components: Dict[str, object], scheduler):
        """The family's pipeline over in-memory components (denoiser, vae, text encoders, tokenizers)."""
        import ppdiffusers

        pipeline_class = getattr(ppdiffusers, self.pipeline_class)
        return pipeline_class(**components, scheduler=scheduler, **self.pipeline_extras)

    def load_pipeline(self, path: str, revision: Optional[str] = None):
        """The family's pipeline from a folder or hub id, with the same extras as `build_pipeline`."""
        import ppdiffusers

        from ppdreambooth.families.loading import is_diffusers_folder

        options = {"from_diffusers": True} if os.path.isdir(path) and is_diffusers_folder(path, self.denoiser) else {}
        extras = {k: v for k, v in self.pipeline_extras.items() if k != "feature_extractor"}
        absent = {name: None for name in self.optional_components if os.path.isdir(path)
                  and not os.path.isdir(os.path.join(path, name))}
        return getattr(ppdiffusers, self.pipeline_class).from_pretrained(path, revision=revision, **options, **extras,
                                                                         **absent)

    def save_lora(self, out_dir: str, weight_name: str, layers: Dict[str, Dict]) -> None:
        """Write adapters with the pipeline's own `save_lora_weights` (`layers`: component -> state dict)."""
        import ppdiffusers

        kwargs = {f"{component}_lora_layers": state for component, state in layers.items()}
        getattr(ppdiffusers, self.pipeline_class).save_lora_weights(out_dir, weight_name=weight_name,
                                                                    to_diffusers=False, **kwargs)

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


__all__: List[str] = ["ModelFamily"]
