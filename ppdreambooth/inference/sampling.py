"""One way to sample: the pipeline set-up and the generation loop that class images, validation images, fidelity
scoring, the demo, `generate` and `evaluate` all use, so a prompt and seed give the same image in each of them.

ppdiffusers replaces `paddle.Generator` with a CUDA RNG-state tracker, which on a CPU does not isolate
anything: images "seeded" through `generator=` depend on the global RNG there. Starting latents are
therefore drawn here from NumPy, one `RandomState(seed)` per image, and handed to the pipeline; samplers that
draw fresh noise at every step (euler_a) read Paddle's global RNG, which is seeded with the image's seed. An
image then depends only on its prompt, seed and the sampler settings, on any device.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle

# --scheduler names of `generate` and `evaluate` -> ppdiffusers scheduler classes
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


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


def prepare_for_sampling(pipeline, family, scheduler: Optional[str] = None):
    """Give `pipeline` its sampler (a `SCHEDULERS` name; default the family's deterministic one: DPM-Solver, SD3's
    flow-matching Euler), built from the pipeline's own scheduler config, and silence its progress bar."""
    import ppdiffusers

    name = SCHEDULERS[scheduler] if scheduler else family.sampling_scheduler
    pipeline.scheduler = getattr(ppdiffusers, name).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling_pipeline(path: str, family=None, scheduler: Optional[str] = None, revision: Optional[str] = None,
                      model_family: Optional[str] = None) -> Tuple[object, object]:
    """(family, pipeline) of a model folder or hub id, ready for `generate_images`. The family is detected from the
    folder unless given (`model_family` overrides detection)."""
    from ppdreambooth.families import detect_family

    family = family or detect_family(path, model_family, revision)
    with paddle.utils.unique_name.guard():  # a training model built in this process keeps its parameter names
        pipeline = family.load_pipeline(path, revision)
    return family, prepare_for_sampling(pipeline, family, scheduler)


def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance_scale: float = 7.5,
    negative_prompt: Optional[str] = None,
    call_options: Optional[dict] = None,
    batch_size: int = 1,
    progress=None,
) -> List:
    """PIL images, one per (prompt, seed) pair, in order. `batch_size` pairs go through the pipeline at once
    (class images use --sample_batch_size; everything else one at a time, so an image never depends on its
    neighbours). `call_options` are extra pipeline arguments (a LoRA scale); `progress` a tqdm bar to advance."""
    default = default_image_size(pipeline)
    height, width = height or default, width or default
    images = []
    for start in range(0, len(prompts), max(batch_size, 1)):
        chunk_prompts, chunk_seeds = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
        paddle.seed(chunk_seeds[0])  # ancestral samplers draw fresh noise at every step
        with paddle.no_grad():
            images += pipeline(
                chunk_prompts,
                negative_prompt=[negative_prompt] * len(chunk_prompts) if negative_prompt else None,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=seeded_latents(pipeline, chunk_seeds, height, width),
                height=height,
                width=width,
                **(call_options or {}),
            ).images
        if progress is not None:
            progress.update(len(chunk_prompts))
    return images


def lora_scale_options(family, lora_scale: Optional[float]) -> dict:
    """The pipeline argument that scales loaded LoRA adapters (cross- or joint-attention kwargs, by family)."""
    return {family.lora_scale_kwarg: {"scale": lora_scale}} if lora_scale is not None else {}
