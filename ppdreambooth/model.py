"""`DreamBoothModel`: VAE encode -> noise -> UNet -> DreamBooth loss, in one `forward`.

The VAE is always frozen; the text encoder is frozen unless `--train_text_encoder`. The noise
scheduler is a plain attribute (not a sub-layer), so mixed-precision O2 never casts its float32
`alphas_cumprod`; the frozen encoding, the noising and the loss run in float32 outside autocast.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, List, Optional, Tuple

import paddle
from ppdiffusers import AutoencoderKL
from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

from . import compat  # noqa: F401  (USE_PEFT_BACKEND before ppdiffusers)
from .args import ConfigError, ModelArguments
from .loading import load_components
from .lora import add_text_encoder_lora, add_unet_lora
from .losses import diffusion_target, dreambooth_loss, min_snr_weights

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_folder(path: str, single_file_config: Optional[str] = None) -> None:
    """For a local model folder, name any missing component before anything is loaded."""
    if path.endswith((".safetensors", ".ckpt")):
        if not os.path.isfile(path):
            raise ConfigError(f"--pretrained_model_name_or_path {path} does not exist.")
        if not path.endswith(".safetensors"):
            raise ConfigError(f"{path}: only .safetensors single-file checkpoints are read (not pickled .ckpt).")
        if not single_file_config:
            raise ConfigError(
                f"{path} is a single-file checkpoint, which carries no configuration, tokenizer or scheduler: pass "
                "--single_file_config with a model folder or hub id of the same architecture "
                "(e.g. runwayml/stable-diffusion-v1-5)."
            )
        check_model_folder(single_file_config)
        return
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
            raise ConfigError(
                f"--pretrained_model_name_or_path {path!r} is neither a model folder nor a hub id like 'org/name'."
            )
        return  # a hub id: ppdiffusers downloads it
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ConfigError(
            f"model folder {path} lacks {', '.join(c + '/' for c in missing)}; it must be a Stable Diffusion "
            "pipeline folder (vae/, text_encoder/, tokenizer/, unet/, scheduler/)."
        )


def freeze(layer: paddle.nn.Layer) -> None:
    for param in layer.parameters():
        param.stop_gradient = True
    layer.eval()


class DreamBoothModel(paddle.nn.Layer):
    def __init__(
        self,
        model_args: ModelArguments,
        with_prior_preservation: bool = False,
        recompute: bool = False,
        memory_efficient_attention: bool = False,
    ):
        super().__init__()
        self.with_prior_preservation = with_prior_preservation  # batches are [instance; class] halves
        path, revision = model_args.pretrained_model_name_or_path, model_args.revision
        self.model_args = model_args
        self.tokenizer, text_encoder, vae, self.unet, self.noise_scheduler = load_components(path, revision)
        if model_args.tokenizer_name:
            self.tokenizer = CLIPTokenizer.from_pretrained(model_args.tokenizer_name)
        # Prompts are padded to the tokenizer's length; some saved tokenizers say "unlimited" (1e30).
        self.tokenizer.model_max_length = min(self.tokenizer.model_max_length,
                                              text_encoder.config.max_position_embeddings)
        if model_args.use_lora:
            add_unet_lora(self.unet, model_args.lora_rank, model_args.lora_alpha)
        # Components that never train live outside the Layer tree: AMP O2 (which casts every sub-layer)
        # leaves them in float32, and state_dict()/checkpoints never contain them.
        self._frozen: Dict[str, paddle.nn.Layer] = {"vae": vae}
        self._parked: set = set()  # frozen components moved to the CPU after caching their outputs
        freeze(vae)
        if model_args.train_text_encoder:
            if model_args.use_lora:
                add_text_encoder_lora(text_encoder, model_args.lora_rank, model_args.lora_alpha)
            self.add_sublayer("text_encoder", text_encoder)  # `text_encoder` is a property (below)
        else:
            freeze(text_encoder)
            self._frozen["text_encoder"] = text_encoder
        # The noise scheduler is a plain attribute, not a sub-layer: AMP O2 never casts its alphas_cumprod.
        self.prediction_type = model_args.prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"the scheduler of {path} predicts {self.prediction_type!r}; use --prediction_type epsilon|v_prediction"
            )
        self.scaling_factor = vae.config.scaling_factor
        if recompute:
            self.enable_recompute()
        if memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()

    @property
    def vae(self) -> AutoencoderKL:
        return self._frozen["vae"]

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self._sub_layers.get("text_encoder") or self._frozen["text_encoder"]

    # ----- set-up -------------------------------------------------------------------------------
    def enable_recompute(self) -> None:
        """Gradient checkpointing in the UNet and, when it trains, the text encoder."""
        self.unet.enable_gradient_checkpointing()
        if self.model_args.train_text_encoder:
            self.text_encoder.gradient_checkpointing_enable()


    def trainable_named_parameters(self) -> List[Tuple[str, paddle.Tensor]]:
        return [(n, p) for n, p in self.named_parameters() if not p.stop_gradient]

    def trainable_parameters(self) -> List[paddle.Tensor]:
        return [p for _, p in self.trainable_named_parameters()]

    def text_encoder_parameters(self) -> List[paddle.Tensor]:
        return [p for n, p in self.trainable_named_parameters() if n.startswith("text_encoder.")]

    def parameter_groups(self, learning_rate: float, text_encoder_learning_rate: Optional[float]) -> list:
        """Optimizer parameters: one list, or two groups when the text encoder has its own rate.

        A Paddle group's `learning_rate` multiplies the scheduler's rate, hence the ratio.
        """
        if text_encoder_learning_rate is None or not self.text_encoder_parameters():
            return self.trainable_parameters()
        text_encoder = {id(p) for p in self.text_encoder_parameters()}
        rest = [p for p in self.trainable_parameters() if id(p) not in text_encoder]
        ratio = text_encoder_learning_rate / learning_rate if learning_rate else 0.0
        return [{"params": rest}, {"params": self.text_encoder_parameters(), "learning_rate": ratio}]

    def trainable_state_dict(self) -> Dict[str, paddle.Tensor]:
        """What a checkpoint holds: the trained weights only (no frozen VAE or text encoder)."""
        return dict(self.trainable_named_parameters())

    def release_frozen(self, name: str, keep_on_cpu: bool) -> None:
        """Stop holding a frozen component on the training device once its outputs are cached.

        `keep_on_cpu` parks it in host memory (validation images still need it); otherwise it is dropped
        and the final pipeline takes that component unchanged from the base model.
        """
        layer = self._frozen.pop(name)
        if keep_on_cpu:
            layer.to("cpu")
            self._frozen[name] = layer
            self._parked.add(name)

    @contextlib.contextmanager
    def parked_on_device(self):
        """Bring components parked on the CPU back to the training device for a while (validation)."""
        device = paddle.get_device()
        parked = [self._frozen[name] for name in self._parked] if device != "cpu" else []
        for layer in parked:
            layer.to(device)
        try:
            yield
        finally:
            for layer in parked:
                layer.to("cpu")

    def has_component(self, name: str) -> bool:
        return name in self._frozen or name in self._sub_layers

    # ----- the training step ---------------------------------------------------------------------
    @paddle.no_grad()
    def latent_moments(self, pixel_values: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Mean and standard deviation of the VAE's latent distribution, in float32."""
        with paddle.amp.auto_cast(enable=False):
            dist = self.vae.encode(pixel_values.astype(self.vae.dtype)).latent_dist
            return dist.mean.astype("float32"), dist.std.astype("float32")

    def sample_latents(self, mean: paddle.Tensor, std: paddle.Tensor) -> paddle.Tensor:
        """A scaled latent sample; draws from the RNG exactly as the VAE's own `latent_dist.sample()`."""
        return (mean + std * paddle.randn(mean.shape, dtype="float32")) * self.scaling_factor

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return self.sample_latents(*self.latent_moments(pixel_values))

    def encode_prompts(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        if self.model_args.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        with paddle.no_grad(), paddle.amp.auto_cast(enable=False):
            return self.text_encoder(input_ids)[0]

    def draw_noise(self, latents: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Gaussian noise (plus optional offset noise) and uniform timesteps, one per sample."""
        noise = paddle.randn(latents.shape, dtype="float32")
        if self.model_args.noise_offset:
            noise = noise + self.model_args.noise_offset * paddle.randn(
                [latents.shape[0], latents.shape[1], 1, 1], dtype="float32"
            )
        num_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = paddle.randint(0, num_steps, [latents.shape[0]], dtype="int64")
        return noise, timesteps

    def forward(
        self,
        pixel_values: Optional[paddle.Tensor] = None,
        input_ids: Optional[paddle.Tensor] = None,
        latent_mean: Optional[paddle.Tensor] = None,
        latent_std: Optional[paddle.Tensor] = None,
        prompt_embeds: Optional[paddle.Tensor] = None,
        noise: Optional[paddle.Tensor] = None,
        timesteps: Optional[paddle.Tensor] = None,
    ) -> Dict[str, paddle.Tensor]:
        """Loss for a batch of [instance; class] examples, given as pixels or cached latent moments, and
        as token ids or cached prompt embeddings. `noise`/`timesteps` may be given (tests)."""
        if latent_mean is None:
            latent_mean, latent_std = self.latent_moments(pixel_values)
        with paddle.amp.auto_cast(enable=False):  # latents, noise and the noise schedule in float32
            latents = self.sample_latents(latent_mean, latent_std)
            if noise is None or timesteps is None:
                drawn_noise, drawn_steps = self.draw_noise(latents)
                noise = drawn_noise if noise is None else noise
                timesteps = drawn_steps if timesteps is None else timesteps
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        encoder_hidden_states = prompt_embeds if prompt_embeds is not None else self.encode_prompts(input_ids)
        model_pred = self.unet(
            noisy_latents.astype(self.unet.dtype), timesteps, encoder_hidden_states.astype(self.unet.dtype)
        ).sample
        with paddle.amp.auto_cast(enable=False):
            weights = None
            if self.model_args.snr_gamma is not None:
                weights = min_snr_weights(self.noise_scheduler, timesteps, self.model_args.snr_gamma, self.prediction_type)
            batch = latents.shape[0]
            num_instance = batch // 2 if self.with_prior_preservation else batch
            return dreambooth_loss(model_pred, target, num_instance, self.model_args.prior_loss_weight, weights)
