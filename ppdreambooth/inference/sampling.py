"""Seeded image generation shared by class images, samples and validation.

ppdiffusers replaces `paddle.Generator` with a CUDA RNG-state tracker, which on a CPU does not isolate
anything: images "seeded" through `generator=` depend on the global RNG there. Starting latents are
therefore drawn here from NumPy, one `RandomState(seed)` per image, and handed to the pipeline: with
a deterministic scheduler (DPM-Solver) an image then depends only on its prompt and seed, on any device.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import paddle


def pipeline_denoiser(pipeline):
    """The network a pipeline denoises with (a UNet, or SD3's transformer)."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


def default_image_size(pipeline) -> int:
    return pipeline_denoiser(pipeline).config.sample_size * pipeline.vae_scale_factor


def seeded_latents(pipeline, seeds: Sequence[int], height: int, width: int) -> paddle.Tensor:
    factor = pipeline.vae_scale_factor
    shape = (pipeline_denoiser(pipeline).config.in_channels, height // factor, width // factor)
    arrays = [np.random.RandomState(seed % 2**32).standard_normal(shape) for seed in seeds]
    return paddle.to_tensor(np.stack(arrays).astype(np.float32))


def use_sampling_scheduler(pipeline, family=None) -> None:
    """The family's deterministic sampler (DPM-Solver; SD3: its flow-matching Euler), from the model's config."""
    import ppdiffusers

    name = family.sampling_scheduler if family is not None else "DPMSolverMultistepScheduler"
    pipeline.scheduler = getattr(ppdiffusers, name).from_config(pipeline.scheduler.config)


def use_dpm_solver(pipeline) -> None:
    use_sampling_scheduler(pipeline)


def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_scale: float = 7.5,
) -> List:
    """PIL images, one per (prompt, seed) pair, generated in one batch."""
    default = default_image_size(pipeline)
    height, width = height or default, width or default
    with paddle.no_grad():
        return pipeline(
            list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=seeded_latents(pipeline, seeds, height, width),
            height=height,
            width=width,
        ).images
