"""Training objectives: how clean latents become a noisy input, what the denoiser must predict, and how
each sample's loss is weighted. The objective is chosen by the model family, not by shared code.

`DiffusionObjective` (SD 1.x/2.x, SDXL): DDPM forward process over the model's own noise schedule,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform in [0, T); the target is eps or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0; optional offset noise and Min-SNR weights.
`FlowMatchingObjective` (SD3): rectified flow as diffusers trains it after its 2024 fixes: u drawn from
the `--weighting_scheme` density and mapped onto the scheduler's (shifted) sigma grid, the denoiser sees
x_sigma = (1 - sigma) x_0 + sigma eps at timestep sigma * 1000, and the target is the velocity eps - x_0,
or x_0 with preconditioned outputs; sigma-based loss weights for sigma_sqrt / cosmap.

Every objective answers the same five questions: `draw` (noise and timesteps), `noisy_latents`,
`target`, `prediction` (the raw output as compared with the target) and `loss_weights`. The formulas
themselves are the pure functions of `ppdreambooth.modeling.losses`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import paddle

from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.losses import (
    diffusion_target,
    flow_loss_weights,
    flow_noisy_latents,
    flow_prediction,
    flow_target,
    flow_timestep_density,
    min_snr_weights,
)


class DiffusionObjective:
    def __init__(self, noise_scheduler, prediction_type: Optional[str] = None, noise_offset: float = 0.0,
                 snr_gamma: Optional[float] = None):
        # The scheduler stays a plain attribute (never a sub-layer): AMP O2 never casts its alphas_cumprod.
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"the model's scheduler predicts {self.prediction_type!r}; use --prediction_type epsilon|v_prediction"
            )
        self.noise_offset, self.snr_gamma = noise_offset, snr_gamma

    def draw(self, latents: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Gaussian noise (plus optional offset noise) and uniform timesteps, one per sample."""
        noise = paddle.randn(latents.shape, dtype="float32")
        if self.noise_offset:
            noise = noise + self.noise_offset * paddle.randn([latents.shape[0], latents.shape[1], 1, 1], dtype="float32")
        num_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = paddle.randint(0, num_steps, [latents.shape[0]], dtype="int64")
        return noise, timesteps

    def noisy_latents(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)

    def prediction(self, raw: paddle.Tensor, noisy_latents: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return raw

    def loss_weights(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        if self.snr_gamma is None:
            return None
        return min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma, self.prediction_type)


class FlowMatchingObjective:
    def __init__(self, noise_scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, precondition_outputs: bool = True):
        # A private scheduler: only its sigma grid is read (`set_timesteps` would rewrite it).
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.sigma_grid = paddle.to_tensor(noise_scheduler.sigmas, dtype="float32")
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.precondition_outputs = mode_scale, precondition_outputs
        self.prediction_type = "flow_matching"

    def sigmas(self, timesteps: paddle.Tensor) -> paddle.Tensor:
        return timesteps.astype("float32") / self.num_train_timesteps

    def draw(self, latents: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Gaussian noise, and timesteps sigma * 1000 with sigma on the scheduler's grid, u from the density."""
        noise = paddle.randn(latents.shape, dtype="float32")
        u = flow_timestep_density(latents.shape[0], self.weighting_scheme, self.logit_mean, self.logit_std,
                                  self.mode_scale)
        indices = paddle.clip((u * self.num_train_timesteps).astype("int64"), 0, self.num_train_timesteps - 1)
        return noise, paddle.gather(self.sigma_grid, indices) * self.num_train_timesteps

    def noisy_latents(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_noisy_latents(latents, noise, self.sigmas(timesteps))

    def target(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_target(latents, noise, self.precondition_outputs)

    def prediction(self, raw: paddle.Tensor, noisy_latents: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_prediction(raw, noisy_latents, self.sigmas(timesteps), self.precondition_outputs)

    def loss_weights(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        return flow_loss_weights(self.sigmas(timesteps), self.weighting_scheme)


def build_objective(kind: str, noise_scheduler, prediction_type: Optional[str] = None, noise_offset: float = 0.0,
                    snr_gamma: Optional[float] = None, weighting_scheme: Optional[str] = None,
                    logit_mean: Optional[float] = None, logit_std: Optional[float] = None,
                    mode_scale: Optional[float] = None, precondition_outputs: Optional[int] = None):
    """The objective a family names (`ModelFamily.objective`); unset flow-matching options take SD3's defaults."""
    if kind == "diffusion":
        return DiffusionObjective(noise_scheduler, prediction_type, noise_offset, snr_gamma)
    if kind == "flow":
        return FlowMatchingObjective(
            noise_scheduler, weighting_scheme or "logit_normal",
            0.0 if logit_mean is None else logit_mean,
            1.0 if logit_std is None else logit_std,
            1.29 if mode_scale is None else mode_scale,
            True if precondition_outputs is None else bool(precondition_outputs),
        )
    raise ValueError(f"unknown objective {kind!r}")
