"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, `unet(noisy, t, last hidden state)`.

SD 2 differs only by value (OpenCLIP width, v-prediction at 768 px), which the model's configs carry.
"""
from __future__ import annotations

from typing import Dict

from ppdreambooth.batch import PROMPT_EMBEDS, token_key
from ppdreambooth.families.base import ModelFamily


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    card_tag = "stable-diffusion"

    def encode_prompt(self, text_encoders: Dict[str, object], tokens: Dict[str, object],
                      denoiser_config=None) -> Dict[str, object]:
        return {PROMPT_EMBEDS: text_encoders["text_encoder"](tokens[token_key(0)])[0]}

    def predict(self, denoiser, noisy_latents, timesteps, conditioning: Dict[str, object]):
        return denoiser(noisy_latents, timesteps, conditioning[PROMPT_EMBEDS]).sample
