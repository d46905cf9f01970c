"""The toy world's VAE: an `AutoencoderKL` with three blocks (scale factor 4: 8x8 latents of 32x32 images).

Trained on the pretraining renders, patterns included: a subject stripe is 4 px, one latent cell, and a VAE that
never saw stripes reconstructs a striped cross as a pink blob (TOYWORLD.md), so DreamBooth could never learn it.
`reconstruction_check` scores the decoded subject photos with the world's own pixel scorer before the UNet is
trained on the VAE's latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .pretraining_data import IMAGE_SIZE, to_model_range, to_uint8
from .schedules import cosine_lr, step_and_log
from .scoring import attribute_rates, score_image
from .world import SUBJECT, render, subject_scenes


@dataclass(frozen=True)
class VaeRecipe:
    widths: Tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    steps: int = 1200
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-6  # per latent element: just enough to keep the posterior's variance finite


def build_vae(recipe: VaeRecipe):
    from ppdiffusers import AutoencoderKL

    blocks = len(recipe.widths)
    return AutoencoderKL(
        block_out_channels=list(recipe.widths), layers_per_block=recipe.layers_per_block, norm_num_groups=8,
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, latent_channels=4, sample_size=IMAGE_SIZE,
    )


def vae_loss(vae, batch):
    """MSE of the reconstruction from a posterior sample, plus a small KL term per latent element."""
    posterior = vae.encode(batch).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    kl = posterior.kl().mean() / float(np.prod(posterior.mean.shape[1:]))
    return ((reconstruction - batch) ** 2).mean(), kl


def train_vae(vae, images: np.ndarray, recipe: VaeRecipe, seed: int,
              log: Callable[[str], None] = print, log_every: int = 100) -> List[float]:
    """Train in place on uint8 NHWC `images` (batches drawn by a NumPy generator of `seed`); returns the MSE per
    step. AdamW with linear warm-up and cosine decay to zero, gradients clipped at 1."""
    import paddle

    rng = np.random.default_rng(seed)
    data = to_model_range(images)
    optimizer = paddle.optimizer.AdamW(learning_rate=recipe.lr, parameters=vae.parameters(), weight_decay=0.0,
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    vae.train()
    losses = []
    for step in range(recipe.steps):
        optimizer.set_lr(cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup))
        batch = paddle.to_tensor(data[rng.integers(0, len(data), recipe.batch_size)])
        mse, kl = vae_loss(vae, batch)
        step_and_log(optimizer, mse + recipe.kl_weight * kl, float(mse), losses, step, recipe.steps, log, log_every,
                     "vae (mse)")
    vae.eval()
    return losses


def encode_posteriors(vae, images: np.ndarray, batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """(means, stds) of the posterior of every image, float32 NCHW: the UNet samples its latents from these, so
    the encoder runs once per image instead of once per step."""
    import paddle

    means, stds = [], []
    with paddle.no_grad():
        for start in range(0, len(images), batch_size):
            posterior = vae.encode(paddle.to_tensor(to_model_range(images[start:start + batch_size]))).latent_dist
            means.append(posterior.mean.numpy())
            stds.append(posterior.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def scaling_factor_from(means: np.ndarray) -> float:
    """1 / std of the latent means, SD's recipe: scaled latents then have unit variance, as the noise schedule
    assumes."""
    return float(1.0 / means.std())


def reconstruct(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 renders -> uint8 reconstructions from the posterior means."""
    import paddle

    out = []
    with paddle.no_grad():
        for start in range(0, len(images), batch_size):
            batch = paddle.to_tensor(to_model_range(images[start:start + batch_size]))
            out.append(to_uint8(vae.decode(vae.encode(batch).latent_dist.mean).sample.numpy()))
    return np.concatenate(out)


SUBJECT_CAPTION = "a red and white striped cross on a black background"


def subject_reconstruction_check(vae, n_photos: int = 8, seed: int = 0) -> Dict[str, object]:
    """Score the reconstructed subject photos against their own captions (the photos alternate black and blue
    backgrounds; the photo on black is the brief's reference caption). `all_ok` counts photos whose background,
    class, both colours and stripes all survive the round trip."""
    scenes = subject_scenes(n_photos, seed, SUBJECT)
    images = np.stack([render(scene, IMAGE_SIZE)[0] for scene in scenes])
    recon = reconstruct(vae, images)
    captions = [scene.caption() for scene in scenes]
    scores = [score_image(image, caption) for image, caption in zip(recon, captions)]
    keys = ("background_ok", "class_ok", "colour_ok", "pattern_ok")
    return {
        "photos": len(scenes),
        **{key: int(sum(bool(s[key]) for s in scores)) for key in keys},
        "all_ok": int(sum(all(bool(s[key]) for key in keys) for s in scores)),
        "readings": [f"{s['background']}/{s['shape']}/{s['colour']}+{s['colour2']}/{s['pattern']}" for s in scores],
        "mean_abs_error": float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean()),
    }


def reconstruction_rates(vae, images: np.ndarray, captions: Sequence[str]) -> Dict[str, float]:
    """`attribute_rates` of reconstructions of renders: the ceiling the UNet's samples can reach."""
    return attribute_rates(list(reconstruct(vae, images)), list(captions))


def describe_vae(vae, recipe: VaeRecipe, scaling_factor: Optional[float] = None) -> str:
    params = sum(int(p.numel()) for p in vae.parameters())
    factor = "" if scaling_factor is None else f", scaling_factor {scaling_factor:.4f}"
    return f"AutoencoderKL widths {recipe.widths}, layers_per_block {recipe.layers_per_block}, {params:,} params{factor}"
