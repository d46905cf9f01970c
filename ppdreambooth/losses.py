"""The DreamBooth loss as pure functions of tensors (the tests check them against hand-written formulas).

loss = mean_i w_i * MSE(pred_i, target_i) over the instance half
     + prior_loss_weight * mean_j w_j * MSE(pred_j, target_j) over the class half,
where the target is the noise (epsilon) or the velocity (v_prediction), and w is 1 or the min-SNR
weight. Everything is computed in float32 whatever the model's precision.
"""
from __future__ import annotations

from typing import Dict, Optional

import paddle
from ppdiffusers.training_utils import compute_snr


def diffusion_target(scheduler, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor,
                     prediction_type: str) -> paddle.Tensor:
    """What the UNet must predict: the noise, or the velocity alpha_t * noise - sigma_t * latents."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon or v_prediction")


def min_snr_weights(scheduler, timesteps: paddle.Tensor, gamma: float, prediction_type: str) -> paddle.Tensor:
    """Per-sample Min-SNR weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = paddle.minimum(snr, paddle.full_like(snr, gamma))
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def per_sample_mse(pred: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    diff = pred.astype("float32") - target.astype("float32")
    return (diff * diff).reshape([diff.shape[0], -1]).mean(axis=1)


def dreambooth_loss(
    pred: paddle.Tensor,
    target: paddle.Tensor,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    weights: Optional[paddle.Tensor] = None,
) -> Dict[str, paddle.Tensor]:
    """Instance loss plus weighted prior loss; the batch holds `num_instance` instance rows, then class rows.

    Returns `loss` (for backward) and the detached parts `loss_instance`, `loss_prior` (0 without prior rows).
    """
    mse = per_sample_mse(pred, target)
    if weights is not None:
        mse = mse * weights.astype("float32")
    loss_instance = mse[:num_instance].mean()
    if mse.shape[0] > num_instance:
        loss_prior = mse[num_instance:].mean()
        loss = loss_instance + prior_loss_weight * loss_prior
    else:
        loss_prior = paddle.zeros([], dtype="float32")
        loss = loss_instance
    return {"loss": loss, "loss_instance": loss_instance.detach(), "loss_prior": loss_prior.detach()}
