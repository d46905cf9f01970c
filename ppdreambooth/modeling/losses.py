"""The DreamBooth loss as pure functions of tensors (the tests check them against hand-written formulas).

loss = mean_i w_i * L(pred_i, target_i) over the instance half
     + prior_loss_weight * mean_j w_j * L(pred_j, target_j) over the class half,
where, for DDPM models (SD, SDXL), the target is the noise (epsilon) or the velocity (v_prediction) and w
is 1, the min-SNR weight and/or the debiased-estimation weight; for flow matching (SD3) the target is the
velocity noise - x0 (or x0 with preconditioned outputs) and w a sigma-based weight. L is the mean over elements
of the squared error (--loss_type l2, the default), or of kohya's pseudo-Huber 2 c (sqrt(d^2 + c^2) - c) or
smooth-L1 2 (sqrt(d^2 + c^2) - c) with a threshold c per sample (`huber_threshold`). With `--masked_loss` L is
the mean of m' * loss over elements, m' = u + (1 - u) * mask per latent cell (u: --masked_loss_unmasked_weight),
divided by the mean of m' with --masked_loss_normalize. Everything is computed in float32 whatever the model's
precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


def debiased_weights(scheduler, timesteps: paddle.Tensor, prediction_type: str) -> paddle.Tensor:
    """Per-sample debiased-estimation weights (kohya's --debiased_estimation_loss): 1 / sqrt(SNR), or 1 / (SNR + 1)
    for v-prediction, with SNR capped at 1000 (it is near infinite at t = 0)."""
    snr = compute_snr(scheduler, timesteps)
    snr = paddle.minimum(snr, paddle.full_like(snr, 1000.0))
    return 1.0 / (snr + 1.0) if prediction_type == "v_prediction" else 1.0 / paddle.sqrt(snr)


LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_threshold(timesteps: paddle.Tensor, schedule: str, huber_c: float, num_train_timesteps: int,
                    alphas_cumprod: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """The Huber threshold c of each sample (kohya's schedules): `constant` huber_c; `exponential`
    exp(-alpha t) with alpha = -ln(huber_c) / num_train_timesteps (1 at t = 0, huber_c at the last step);
    `snr` (DDPM only) (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t)."""
    steps = timesteps.astype("float32")
    if schedule == "constant":
        return paddle.full(steps.shape, huber_c, dtype="float32")
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return paddle.exp(-alpha * steps)
    if schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("the snr Huber schedule needs a DDPM noise schedule (alphas_cumprod)")
        abar = paddle.gather(alphas_cumprod.astype("float32"), timesteps.astype("int64"))
        sigma = paddle.sqrt((1.0 - abar) / abar)
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}; use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: paddle.Tensor, target: paddle.Tensor, loss_type: str = "l2",
                     huber_c: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """The loss of each element, in float32: d^2 (l2), 2 c (sqrt(d^2 + c^2) - c) (huber) or 2 (sqrt(d^2 + c^2) - c)
    (smooth_l1), d = pred - target, c the per-sample threshold."""
    diff = pred.astype("float32") - target.astype("float32")
    if loss_type == "l2":
        return diff * diff
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    c = huber_c.astype("float32").reshape([-1] + [1] * (diff.ndim - 1))
    excess = paddle.sqrt(diff * diff + c * c) - c
    return 2.0 * c * excess if loss_type == "huber" else 2.0 * excess


def per_sample_mse(pred: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
    diff = pred.astype("float32") - target.astype("float32")
    return (diff * diff).reshape([diff.shape[0], -1]).mean(axis=1)


@dataclass(frozen=True)
class MaskedLoss:
    """--masked_loss's options: the weight of the area outside the mask, and whether to divide by the mask's
    mean weight (so a small subject's loss is not scaled down by its area)."""

    unmasked_weight: float = 0.0
    normalize: bool = False


def mask_weights(mask: paddle.Tensor, options: MaskedLoss) -> paddle.Tensor:
    """Per-cell weights u + (1 - u) * mask, float32, (n, 1, h, w): broadcast over the latent channels. u = 0
    gives the mask itself, bit for bit."""
    mask = mask.astype("float32")
    if options.unmasked_weight == 0:
        return mask
    return options.unmasked_weight + (1.0 - options.unmasked_weight) * mask


def per_sample_loss(pred: paddle.Tensor, target: paddle.Tensor, loss_type: str = "l2",
                    huber_c: Optional[paddle.Tensor] = None, mask: Optional[paddle.Tensor] = None,
                    masked: MaskedLoss = MaskedLoss()) -> paddle.Tensor:
    """`elementwise_loss` averaged over each sample (l2 without a mask: exactly `per_sample_mse`); a `mask`
    (n, 1, h, w) weights each latent cell before the mean (an all-ones mask changes no bit)."""
    if loss_type == "l2" and mask is None:
        return per_sample_mse(pred, target)
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is None:
        return loss.reshape([loss.shape[0], -1]).mean(axis=1)
    weights = mask_weights(mask, masked)
    loss = (loss * weights).reshape([loss.shape[0], -1]).mean(axis=1)
    if masked.normalize:  # the mean over the weighted area; a row whose weights are all 0 stays 0
        area = weights.reshape([weights.shape[0], -1]).mean(axis=1)
        loss = loss / paddle.maximum(area, paddle.full_like(area, 1e-6))
    return loss


def dreambooth_loss(
    pred: paddle.Tensor,
    target: paddle.Tensor,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    weights: Optional[paddle.Tensor] = None,
    loss_type: str = "l2",
    huber_c: Optional[paddle.Tensor] = None,
    mask: Optional[paddle.Tensor] = None,
    masked: MaskedLoss = MaskedLoss(),
) -> Dict[str, paddle.Tensor]:
    """Instance loss plus weighted prior loss; the batch holds `num_instance` instance rows, then class rows.
    `loss_type` huber or smooth_l1 needs `huber_c`, one threshold per row; `mask` (--masked_loss) weights each
    latent cell of each row (class rows carry all ones).

    Returns `loss` (for backward) and the detached parts `loss_instance`, `loss_prior` (0 without prior rows).
    """
    mse = per_sample_loss(pred, target, loss_type, huber_c, mask, masked)
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


# ----- flow matching (SD3) ------------------------------------------------------------------------------
# ppdiffusers 0.29's training_utils lacks diffusers' compute_density_for_timestep_sampling and
# compute_loss_weighting_for_sd3; these are the same formulas (after diffusers' mid-2024 fixes).


def flow_timestep_density(batch: int, scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                          mode_scale: float = 1.29) -> paddle.Tensor:
    """u in [0, 1] per sample, drawn from the density that `scheme` names (uniform for the weighting-only
    schemes): logit-normal sigmoid(N(mean, std)); "mode" 1 - u - s * (cos(pi u / 2)^2 - 1 + u), u uniform."""
    if scheme == "logit_normal":
        return paddle.nn.functional.sigmoid(paddle.normal(mean=logit_mean, std=logit_std, shape=[batch]))
    u = paddle.rand([batch], dtype="float32")
    if scheme == "mode":
        return 1.0 - u - mode_scale * (paddle.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def flow_noisy_latents(latents: paddle.Tensor, noise: paddle.Tensor, sigmas: paddle.Tensor) -> paddle.Tensor:
    """The straight path from data to noise: (1 - sigma) * x0 + sigma * noise."""
    sigmas = sigmas.reshape([-1] + [1] * (latents.ndim - 1))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_target(latents: paddle.Tensor, noise: paddle.Tensor, precondition_outputs: bool) -> paddle.Tensor:
    """x0 when outputs are preconditioned, else the velocity noise - x0."""
    return latents if precondition_outputs else noise - latents


def flow_prediction(raw: paddle.Tensor, noisy_latents: paddle.Tensor, sigmas: paddle.Tensor,
                    precondition_outputs: bool) -> paddle.Tensor:
    """The denoiser's output as compared with `flow_target`: preconditioned to x0 = noisy - sigma * v."""
    if not precondition_outputs:
        return raw
    return noisy_latents - sigmas.reshape([-1] + [1] * (raw.ndim - 1)) * raw.astype("float32")


def flow_loss_weights(sigmas: paddle.Tensor, scheme: str) -> Optional[paddle.Tensor]:
    """Per-sample loss weights: 1 / sigma^2 (sigma_sqrt), 2 / (pi (1 - 2 sigma + 2 sigma^2)) (cosmap), else none."""
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
    return None
