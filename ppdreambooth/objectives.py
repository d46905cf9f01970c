"""Training objectives: how clean latents become a noisy input, what the denoiser must predict, and how
each sample's loss is weighted. The objective is chosen by the model family, not by shared code.

`DiffusionObjective` (SD 1.x/2.x, SDXL): DDPM forward process over the model's own noise schedule,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform in [0, T); the target is eps or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0; optional offset noise and Min-SNR weights.
The formulas themselves are the pure functions of `ppdreambooth.losses`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import paddle

from .args import ConfigError
from .losses import diffusion_target, min_snr_weights


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

    def loss_weights(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        if self.snr_gamma is None:
            return None
        return min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma, self.prediction_type)


def build_objective(kind: str, noise_scheduler, model_args) -> DiffusionObjective:
    """The objective a family names (`ModelFamily.objective`), configured from the model arguments."""
    if kind == "diffusion":
        return DiffusionObjective(noise_scheduler, model_args.prediction_type, model_args.noise_offset,
                                  model_args.snr_gamma)
    raise ValueError(f"unknown objective {kind!r}")
