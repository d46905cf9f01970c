"""The plain DreamBooth training loop, written out step by step, as the yardstick for ppdreambooth's step.

It does what ppdiffusers' `train_dreambooth.py` does per step and nothing else: VAE encode (a latent
sample), Gaussian noise, uniform timesteps, the UNet, the epsilon MSE, and Paddle's AdamW with global-norm
gradient clipping. No Trainer, no caching, no dataset machinery: the caller hands it the pixel batches.
Used by `tests/test_reference_step.py` (weights must agree after a few steps) and by
`benchmarks/bench_fitting.py` (how fast each learns the subject).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import numpy as np
import paddle


def load_plain(model_path: str):
    """(tokenizer, text_encoder, vae, unet, scheduler) straight from ppdiffusers, nothing of ppdreambooth."""
    from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    for layer in (text_encoder, vae):
        for p in layer.parameters():
            p.stop_gradient = True
        layer.eval()
    return tokenizer, text_encoder, vae, unet, scheduler


def plain_optimizer(unet, learning_rate: float, weight_decay: float = 1e-2, max_grad_norm: float = 1.0,
                    decay_all: bool = True):
    """AdamW as the seed script builds it (decay on every weight), or with biases and norms exempt."""
    names = {p.name: n for n, p in unet.named_parameters()}
    decayed = None if decay_all else (lambda name: not any(k in names[name] for k in ("bias", "norm")))
    return paddle.optimizer.AdamW(
        learning_rate=learning_rate, parameters=unet.parameters(), beta1=0.9, beta2=0.999, epsilon=1e-8,
        weight_decay=weight_decay, apply_decay_param_fun=decayed,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(max_grad_norm) if max_grad_norm > 0 else None,
    )


def train_plain(
    model_path: str,
    prompt: str,
    batches: Iterable[np.ndarray],
    learning_rate: float,
    seed: int,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
    decay_all: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
):
    """Train the UNet on `batches` (float32 NCHW pixels in [-1, 1]); returns (unet, losses per step)."""
    with paddle.utils.unique_name.guard():
        tokenizer, text_encoder, vae, unet, scheduler = load_plain(model_path)
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pd").input_ids
    optimizer = plain_optimizer(unet, learning_rate, weight_decay, max_grad_norm, decay_all)
    unet.train()
    paddle.seed(seed)
    losses: List[float] = []
    for step, pixels in enumerate(batches):
        pixels = paddle.to_tensor(pixels)
        with paddle.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids.tile([pixels.shape[0], 1]))[0]
        noise = paddle.randn(latents.shape, dtype="float32")
        timesteps = paddle.randint(0, scheduler.config.num_train_timesteps, [latents.shape[0]], dtype="int64")
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, hidden).sample
        loss = ((pred - noise) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return unet, losses
