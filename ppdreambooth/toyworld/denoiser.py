"""The toy world's text encoder and UNet, trained jointly on VAE latents with SD's DDPM epsilon objective.

Latents are sampled from posteriors encoded once (`vae.encode_posteriors`), so a step costs only the text encoder
and the UNet. Noise, timesteps and the empty-caption draws come from one NumPy generator of the build seed, which
makes a build a function of its seed. About a tenth of the captions are emptied so that the model also learns the
unconditional prediction that classifier-free guidance needs; with `short_caption_share` a share of the rest is shortened
(`world.short_captions`: "a cross", "a red cross", "a cross on a blue background") so that, like a real base model,
it draws a plausible object for a prompt that leaves attributes out: DreamBooth's class prompt is such a prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .schedules import cosine_lr, min_snr_weights, step_and_log
from .tokenizer import MODEL_MAX_LENGTH
from .world import short_captions

# SD 1.x's noise schedule; the pipeline's scheduler config repeats it (see `pretrain.scheduler_config`).
NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass(frozen=True)
class DenoiserRecipe:
    widths: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_levels: Tuple[bool, ...] = (True, True)  # at 8x8 too, as in the README's measured runs
    attention_head_dim: int = 8
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    steps: int = 6000  # 15 minutes on one thread; the README's measured figures
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_snr_gamma: float = 5.0
    empty_caption_share: float = 0.1
    # of the rest: the class alone, the object alone or the class in its setting (0: the shipped model's recipe;
    # `pretrain --short_caption_share 0.25` builds the candidate that draws the class for "a cross")
    short_caption_share: float = 0.0


def build_text_encoder(tokenizer, recipe: DenoiserRecipe):
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=4 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=recipe.text_width, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(recipe: DenoiserRecipe, latent_size: int):
    from ppdiffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=recipe.widths,
        layers_per_block=recipe.layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=recipe.text_width, attention_head_dim=recipe.attention_head_dim, norm_num_groups=8,
    )


def token_ids(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """int64 (N, MODEL_MAX_LENGTH) ids, padded as the pipeline pads prompts."""
    ids = tokenizer(list(captions), padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)["input_ids"]
    return np.asarray(ids, np.int64)


def noise_schedule_alphas() -> np.ndarray:
    """alphas_cumprod of NOISE_SCHEDULE, taken from DDPMScheduler itself so training noises exactly as the
    pipeline's samplers assume."""
    from ppdiffusers import DDPMScheduler

    return DDPMScheduler(clip_sample=False, **NOISE_SCHEDULE).alphas_cumprod.numpy().astype(np.float64)


@dataclass
class LatentSet:
    """Training pairs: posterior (means, stds) already multiplied by the scaling factor, and caption ids."""

    means: np.ndarray
    stds: np.ndarray
    ids: np.ndarray
    empty_ids: np.ndarray
    short_ids: Optional[np.ndarray] = None  # (N, 3, length): each caption's `world.short_captions`


def short_caption_ids(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """(N, 3, MODEL_MAX_LENGTH) ids of every caption's three shortened forms (`world.short_captions`)."""
    shortened = [short for caption in captions for short in short_captions(caption)]
    return token_ids(tokenizer, shortened).reshape(len(captions), 3, -1)


def draw_batch(data: LatentSet, rng: np.random.Generator, recipe: DenoiserRecipe, alphas: np.ndarray):
    """(noisy latents, timesteps, ids, noise, loss weights) for one step, all NumPy."""
    index = rng.integers(0, len(data.means), recipe.batch_size)
    latents = data.means[index] + data.stds[index] * rng.standard_normal(data.means[index].shape)
    noise = rng.standard_normal(latents.shape)
    timesteps = rng.integers(0, len(alphas), recipe.batch_size)
    abar = alphas[timesteps][:, None, None, None]
    noisy = np.sqrt(abar) * latents + np.sqrt(1.0 - abar) * noise
    ids = data.ids[index].copy()
    if data.short_ids is not None and recipe.short_caption_share > 0:
        shortened = rng.random(recipe.batch_size) < recipe.short_caption_share
        form = rng.integers(0, data.short_ids.shape[1], recipe.batch_size)
        ids[shortened] = data.short_ids[index[shortened], form[shortened]]
    ids[rng.random(recipe.batch_size) < recipe.empty_caption_share] = data.empty_ids
    weights = min_snr_weights(alphas, timesteps, recipe.min_snr_gamma)
    return noisy.astype(np.float32), timesteps, ids, noise.astype(np.float32), weights


def train_denoiser(text_encoder, unet, data: LatentSet, recipe: DenoiserRecipe, seed: int,
                   log: Callable[[str], None] = print, log_every: int = 250,
                   after_step: Optional[Callable[[int], None]] = None) -> List[float]:
    """Train both networks in place; returns the (weighted) loss per step. AdamW, warm-up then cosine to zero,
    global gradient clipping at 1. No weight decay: it would shrink the embeddings of tokens no caption uses
    (`sks` above all), which must stay as initialised; Adam leaves a row whose gradient is always zero alone."""
    import paddle

    rng = np.random.default_rng(seed)
    alphas = noise_schedule_alphas()
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = paddle.optimizer.AdamW(learning_rate=recipe.lr, parameters=parameters, weight_decay=0.0,
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    text_encoder.train()
    unet.train()
    losses: List[float] = []
    for step in range(recipe.steps):
        optimizer.set_lr(cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup))
        noisy, timesteps, ids, noise, weights = draw_batch(data, rng, recipe, alphas)
        states = text_encoder(paddle.to_tensor(ids))[0]
        prediction = unet(paddle.to_tensor(noisy), paddle.to_tensor(timesteps), states).sample
        per_sample = ((prediction - paddle.to_tensor(noise)) ** 2).mean(axis=[1, 2, 3])
        loss = (per_sample * paddle.to_tensor(weights)).mean()
        step_and_log(optimizer, loss, float(loss), losses, step, recipe.steps, log, log_every, "unet (weighted loss)")
        if after_step is not None:  # e.g. the benchmark's scoring at chosen steps; it must restore train mode
            after_step(step + 1)
    text_encoder.eval()
    unet.eval()
    return losses


def parameter_count(layer) -> int:
    return sum(int(p.numel()) for p in layer.parameters())
