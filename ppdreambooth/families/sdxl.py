"""Stable Diffusion XL: two CLIP text encoders, a pooled embedding and size conditioning.

As SDXL was trained (and as ppdiffusers' `StableDiffusionXLPipeline.encode_prompt` conditions it):
- the prompt embedding is the penultimate hidden state of both encoders, concatenated on channels;
- the pooled embedding is the projected output of the second encoder (`text_embeds`);
- the UNet also reads per-sample `time_ids` = (original height, width of the photo before resizing,
  top and left of the crop actually taken, target height and width).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from ppdreambooth.batch import POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS, TIME_IDS, Size, token_key
from ppdreambooth.families.base import ModelFamily


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    pipeline_extras = {"add_watermarker": False}  # the watermark needs the invisible-watermark package
    card_tag = "stable-diffusion-xl"
    textual_inversion_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    def encode_prompt(self, text_encoders: Dict[str, object], tokens: Dict[str, object],
                      denoiser_config=None) -> Dict[str, object]:
        import paddle

        states, pooled = [], None
        for n, name in enumerate(self.text_encoders):
            output = text_encoders[name](tokens[token_key(n)], output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled output
        return {PROMPT_EMBEDS: paddle.concat(states, axis=-1), POOLED_PROMPT_EMBEDS: pooled}

    def size_conditioning(self, original: Size, corner: Size, target: Size) -> Dict[str, np.ndarray]:
        return {TIME_IDS: np.asarray([*original, *corner, *target], dtype=np.float32)}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning: Dict[str, object]):
        added = {"text_embeds": conditioning[POOLED_PROMPT_EMBEDS], "time_ids": conditioning[TIME_IDS]}
        return denoiser(noisy_latents, timesteps, conditioning[PROMPT_EMBEDS], added_cond_kwargs=added).sample
