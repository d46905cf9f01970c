"""Learning-rate and loss-weight schedules, and the optimizer step, shared by the VAE and UNet training loops."""
from __future__ import annotations

import math

import numpy as np


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def min_snr_weights(alphas_cumprod: np.ndarray, timesteps: np.ndarray, gamma: float) -> np.ndarray:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR. The many
    low-noise steps, whose epsilon is nearly unpredictable and irrelevant to the layout, stop dominating the
    gradient; gamma <= 0 turns the weighting off."""
    if gamma <= 0:
        return np.ones(len(timesteps), np.float32)
    abar = alphas_cumprod[timesteps]
    snr = abar / (1.0 - abar)
    return (np.minimum(snr, gamma) / snr).astype(np.float32)


def step_and_log(optimizer, objective, reported: float, losses: list, step: int, total: int, log, log_every: int,
                 name: str) -> None:
    """Backward `objective`, step and clear; record `reported` and log its mean every `log_every` steps."""
    objective.backward()
    optimizer.step()
    optimizer.clear_grad()
    losses.append(reported)
    if (step + 1) % log_every == 0 or step + 1 == total:
        log(f"{name} step {step + 1}/{total}: {np.mean(losses[-log_every:]):.5f}")
