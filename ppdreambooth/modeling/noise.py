"""Noise and timestep variants (the options kohya's sd-scripts offers) as pure functions of tensors; the tests check
each against a NumPy transcription. The objectives (`ppdreambooth.modeling.objectives`) call them, and only when
an option is on: with every option off the draws, and so the loss, are exactly those of plain training.

- offset noise with an adaptive strength: noise + s * N(0, 1) per (sample, channel), where
  s = max(0, noise_offset + adaptive_noise_scale * |mean over the latent plane|)       (DDPM)
- multi-resolution ("pyramid") noise: noise + sum_i discount^i * upsample(N(0, 1) at size / r_i^i),
  r_i uniform in [2, 4), stopping at a side of 1; then divided by its standard deviation            (DDPM)
- input perturbation (Ning et al. 2023): the noisy input is made with noise + gamma * N(0, 1) while the
  target keeps the plain noise                                                                     (DDPM)
- a timestep range: DDPM timesteps uniform in [min, max); flow matching keeps the sigmas of the scheduler's
  grid with min <= 1000 sigma <= max, and spreads the drawn density over them                       (both)

Every random draw goes through Paddle's generator (kohya draws the pyramid's factors with Python's `random`):
the checkpointed RNG state then covers them, and a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import paddle
import paddle.nn.functional as F


def offset_noise(noise: paddle.Tensor, latents: paddle.Tensor, noise_offset: float,
                 adaptive_noise_scale: float = 0.0) -> paddle.Tensor:
    """Offset noise: one N(0, 1) value per (sample, channel) plane times the strength; with an adaptive scale the
    strength is noise_offset + scale * |the latents' mean over that plane|, floored at 0."""
    strength = noise_offset
    if adaptive_noise_scale:
        plane_mean = paddle.abs(latents.astype("float32").mean(axis=[2, 3], keepdim=True))
        strength = paddle.clip(noise_offset + adaptive_noise_scale * plane_mean, min=0.0)
    return noise + strength * paddle.randn([latents.shape[0], latents.shape[1], 1, 1], dtype="float32")


def pyramid_noise(noise: paddle.Tensor, iterations: int, discount: float) -> paddle.Tensor:
    """Multi-resolution noise: at level i a Gaussian of side / r_i^i (at least 1), bilinearly upsampled to the
    full size and scaled by discount^i, is added; r_i is uniform in [2, 4) (one draw of all `iterations` factors
    first, then one Gaussian per level used); the levels stop after the first with a side of 1. The sum is
    renormalised to unit standard deviation (over the whole batch)."""
    batch, channels, height, width = noise.shape
    factors = (paddle.rand([iterations], dtype="float32") * 2.0 + 2.0).numpy()
    for level in range(iterations):
        shrink = float(factors[level]) ** level
        low_h, low_w = max(1, int(height / shrink)), max(1, int(width / shrink))
        low = paddle.randn([batch, channels, low_h, low_w], dtype="float32")
        up = F.interpolate(low, size=[height, width], mode="bilinear", align_corners=False)
        noise = noise + up * discount ** level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: paddle.Tensor, gamma: float) -> paddle.Tensor:
    """The noise the noisy input is made with under input perturbation: noise + gamma * N(0, 1) (gamma 0: noise
    itself, drawing nothing)."""
    if not gamma:
        return noise
    return noise + gamma * paddle.randn(noise.shape, dtype="float32")


def flow_index_range(sigmas: np.ndarray, min_timestep: float, max_timestep: float) -> Tuple[int, int]:
    """(first index, count) of the entries of a decreasing sigma grid with min <= 1000 sigma <= max; count 0 when
    none is."""
    timesteps = np.asarray(sigmas, dtype=np.float64) * 1000.0
    inside = np.nonzero((timesteps >= min_timestep) & (timesteps <= max_timestep))[0]
    if len(inside) == 0:
        return 0, 0
    return int(inside[0]), int(inside[-1] - inside[0] + 1)


def flow_grid_indices(u: paddle.Tensor, first: int, count: int) -> paddle.Tensor:
    """Grid indices for u in [0, 1]: the `count` entries from `first` on, taken in the grid's order."""
    return first + paddle.clip((u * count).astype("int64"), 0, count - 1)
