"""Training objectives: how clean latents become a noisy input, what the denoiser must predict, and how
each sample's loss is weighted. The objective is chosen by the model family, not by shared code.

`DiffusionObjective` (SD 1.x/2.x, SDXL): DDPM forward process over the model's own noise schedule,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with t uniform in [0, T); the target is eps or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0; optional offset noise (with an adaptive strength),
pyramid noise, input perturbation, a timestep range, Min-SNR and debiased-estimation weights.
`FlowMatchingObjective` (SD3): rectified flow as diffusers trains it after its 2024 fixes: u drawn from
the `--weighting_scheme` density and mapped onto the scheduler's (shifted) sigma grid, the denoiser sees
x_sigma = (1 - sigma) x_0 + sigma eps at timestep sigma * 1000, and the target is the velocity eps - x_0,
or x_0 with preconditioned outputs; sigma-based loss weights for sigma_sqrt / cosmap.

Every objective answers the same questions: `draw` (noise and timesteps), `input_noise` (the noise the noisy
input is made with), `noisy_latents`, `target`, `prediction` (the raw output as compared with the target),
`loss_weights`, and `loss_type` with `huber_threshold` (how each element's error counts). `LossVariants` holds
the loss and noise variants of kohya's sd-scripts (all off by default, and then nothing is drawn or computed
differently). The formulas themselves are the pure functions of `ppdreambooth.modeling.losses` and
`ppdreambooth.modeling.noise`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import paddle

from ppdreambooth.errors import ConfigError
from ppdreambooth.modeling.losses import (
    debiased_weights,
    diffusion_target,
    flow_loss_weights,
    flow_noisy_latents,
    flow_prediction,
    flow_target,
    flow_timestep_density,
    huber_threshold,
    min_snr_weights,
)
from ppdreambooth.modeling.noise import (
    flow_grid_indices,
    flow_index_range,
    offset_noise,
    perturbed_noise,
    pyramid_noise,
)


@dataclass(frozen=True)
class LossVariants:
    """The loss and noise variants (README "Loss and noise variants"); the defaults are plain training.

    `loss_type` l2 | huber | smooth_l1 with the threshold `huber_schedule` constant | exponential | snr and
    `huber_c`; timesteps limited to [min_timestep, max_timestep) (None: the whole schedule). DDPM only:
    `multires_noise_iterations` levels of pyramid noise discounted by `multires_noise_discount`,
    `adaptive_noise_scale` (with offset noise), `ip_noise_gamma` input perturbation, `debiased_estimation_loss`."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    adaptive_noise_scale: float = 0.0
    ip_noise_gamma: float = 0.0
    debiased_estimation_loss: bool = False

    def timestep_range(self, num_train_timesteps: int) -> Tuple[int, int]:
        """[low, high) of the timesteps to draw, checked against the schedule's length."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not 0 <= low < high <= num_train_timesteps:
            raise ConfigError(f"--min_timestep {low} / --max_timestep {high}: timesteps are drawn from [min, max), "
                              f"which must lie within this model's {num_train_timesteps} training timesteps.")
        return low, high


class DiffusionObjective:
    def __init__(self, noise_scheduler, prediction_type: Optional[str] = None, noise_offset: float = 0.0,
                 snr_gamma: Optional[float] = None, variants: Optional[LossVariants] = None):
        # The scheduler stays a plain attribute (never a sub-layer): AMP O2 never casts its alphas_cumprod.
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"the model's scheduler predicts {self.prediction_type!r}; use --prediction_type epsilon|v_prediction"
            )
        self.noise_offset, self.snr_gamma = noise_offset, snr_gamma
        self.variants = variants or LossVariants()
        self.timestep_range = self.variants.timestep_range(noise_scheduler.config.num_train_timesteps)

    @property
    def loss_type(self) -> str:
        return self.variants.loss_type

    def draw(self, latents: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Gaussian noise (plus optional offset and pyramid noise) and uniform timesteps in the range, one per
        sample."""
        variants = self.variants
        noise = paddle.randn(latents.shape, dtype="float32")
        if self.noise_offset:
            noise = offset_noise(noise, latents, self.noise_offset, variants.adaptive_noise_scale)
        if variants.multires_noise_iterations:
            noise = pyramid_noise(noise, variants.multires_noise_iterations, variants.multires_noise_discount)
        low, high = self.timestep_range
        timesteps = paddle.randint(low, high, [latents.shape[0]], dtype="int64")
        return noise, timesteps

    def input_noise(self, noise: paddle.Tensor) -> paddle.Tensor:
        """The noise the noisy input is made with: `noise` itself, or perturbed (--ip_noise_gamma)."""
        return perturbed_noise(noise, self.variants.ip_noise_gamma)

    def noisy_latents(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)

    def prediction(self, raw: paddle.Tensor, noisy_latents: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return raw

    def loss_weights(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        weights = None
        if self.snr_gamma is not None:
            weights = min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma, self.prediction_type)
        if self.variants.debiased_estimation_loss:
            debiased = debiased_weights(self.noise_scheduler, timesteps, self.prediction_type)
            weights = debiased if weights is None else weights * debiased
        return weights

    def huber_threshold(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        """The per-sample threshold of the huber / smooth_l1 loss (None for l2)."""
        variants = self.variants
        if variants.loss_type == "l2":
            return None
        return huber_threshold(timesteps, variants.huber_schedule, variants.huber_c,
                               self.noise_scheduler.config.num_train_timesteps, self.noise_scheduler.alphas_cumprod)


class FlowMatchingObjective:
    # LossVariants fields that act on the DDPM schedule (the preflight refuses them for SD3 first)
    DDPM_ONLY = ("multires_noise_iterations", "adaptive_noise_scale", "ip_noise_gamma", "debiased_estimation_loss")

    def __init__(self, noise_scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, precondition_outputs: bool = True,
                 variants: Optional[LossVariants] = None):
        # A private scheduler: only its sigma grid is read (`set_timesteps` would rewrite it).
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.sigma_grid = paddle.to_tensor(noise_scheduler.sigmas, dtype="float32")
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.precondition_outputs = mode_scale, precondition_outputs
        self.prediction_type = "flow_matching"
        self.variants = variants = variants or LossVariants()
        given = [name for name in self.DDPM_ONLY if getattr(variants, name)]
        if given:
            raise ConfigError(f"--{given[0]} acts on a DDPM noise schedule; SD3 trains by flow matching")
        if variants.loss_type != "l2" and variants.huber_schedule == "snr":
            raise ConfigError("--huber_schedule snr needs a DDPM noise schedule; SD3 trains by flow matching: "
                              "use --huber_schedule constant or exponential")
        self.grid_range = None  # (first index, count) of the sigma grid to draw from; None: all of it
        low, high = self.variants.timestep_range(self.num_train_timesteps)
        if (low, high) != (0, self.num_train_timesteps):
            first, count = flow_index_range(self.sigma_grid.numpy(), low, high)
            if count == 0:
                top, bottom = float(self.sigma_grid.max()) * 1000, float(self.sigma_grid.min()) * 1000
                raise ConfigError(f"--min_timestep {low} / --max_timestep {high}: no sigma of this model's flow-"
                                  f"matching grid has 1000 sigma in [{low}, {high}] (the grid runs from "
                                  f"{bottom:.1f} to {top:.1f}); widen the range.")
            if count < self.sigma_grid.shape[0]:
                self.grid_range = (first, count)

    @property
    def loss_type(self) -> str:
        return self.variants.loss_type

    def sigmas(self, timesteps: paddle.Tensor) -> paddle.Tensor:
        return timesteps.astype("float32") / self.num_train_timesteps

    def draw(self, latents: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Gaussian noise, and timesteps sigma * 1000 with sigma on the scheduler's grid, u from the density."""
        noise = paddle.randn(latents.shape, dtype="float32")
        u = flow_timestep_density(latents.shape[0], self.weighting_scheme, self.logit_mean, self.logit_std,
                                  self.mode_scale)
        if self.grid_range is None:
            indices = paddle.clip((u * self.num_train_timesteps).astype("int64"), 0, self.num_train_timesteps - 1)
        else:  # --min_timestep / --max_timestep: the density spread over the grid entries in the range
            indices = flow_grid_indices(u, *self.grid_range)
        return noise, paddle.gather(self.sigma_grid, indices) * self.num_train_timesteps

    def input_noise(self, noise: paddle.Tensor) -> paddle.Tensor:
        return noise

    def noisy_latents(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_noisy_latents(latents, noise, self.sigmas(timesteps))

    def target(self, latents: paddle.Tensor, noise: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_target(latents, noise, self.precondition_outputs)

    def prediction(self, raw: paddle.Tensor, noisy_latents: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
        return flow_prediction(raw, noisy_latents, self.sigmas(timesteps), self.precondition_outputs)

    def loss_weights(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        return flow_loss_weights(self.sigmas(timesteps), self.weighting_scheme)

    def huber_threshold(self, timesteps: paddle.Tensor) -> Optional[paddle.Tensor]:
        """The per-sample threshold of the huber / smooth_l1 loss at timestep 1000 sigma (None for l2)."""
        variants = self.variants
        if variants.loss_type == "l2":
            return None
        return huber_threshold(timesteps, variants.huber_schedule, variants.huber_c, self.num_train_timesteps)


def build_objective(kind: str, noise_scheduler, prediction_type: Optional[str] = None, noise_offset: float = 0.0,
                    snr_gamma: Optional[float] = None, weighting_scheme: Optional[str] = None,
                    logit_mean: Optional[float] = None, logit_std: Optional[float] = None,
                    mode_scale: Optional[float] = None, precondition_outputs: Optional[int] = None,
                    variants: Optional[LossVariants] = None):
    """The objective a family names (`ModelFamily.objective`); unset flow-matching options take SD3's defaults;
    `variants`: the loss and noise variants (None: none)."""
    if kind == "diffusion":
        return DiffusionObjective(noise_scheduler, prediction_type, noise_offset, snr_gamma, variants)
    if kind == "flow":
        return FlowMatchingObjective(
            noise_scheduler, weighting_scheme or "logit_normal",
            0.0 if logit_mean is None else logit_mean,
            1.0 if logit_std is None else logit_std,
            1.29 if mode_scale is None else mode_scale,
            True if precondition_outputs is None else bool(precondition_outputs),
            variants,
        )
    raise ValueError(f"unknown objective {kind!r}")
