"""`DreamBoothModel`: VAE encode -> noise -> denoiser -> DreamBooth loss, in one `forward`, for any family.

What differs between model families (text encoders, conditioning, the denoiser call, the objective)
is asked of `self.family` (`ppdreambooth.families`) and `self.objective` (`ppdreambooth.modeling.objectives`).
The VAE is always frozen; the text encoders are frozen unless `--train_text_encoder`. Components are
reached by their subfolder name (`model.unet`, `model.text_encoder_2`, `model.vae`). The frozen ones
live outside the Layer tree, so AMP O2 never casts them and checkpoints never hold them; the frozen
encoding, the noising and the loss run in float32 outside autocast.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional, Tuple

import paddle

from ppdreambooth.batch import (
    LATENT_CACHED,
    LATENT_MEAN,
    LATENT_STD,
    LOSS_MASK,
    NOISE,
    PROMPT_EMBEDS,
    TIMESTEPS,
    is_token_key,
    token_key,
)
from ppdreambooth.config.arguments import DENOISER_PRESETS
from ppdreambooth.config.lora_blocks import check_blocks_for_model
from ppdreambooth.families import ModelFamily
from ppdreambooth.modeling.dora import add_dora
from ppdreambooth.modeling.lora import LoraSpec, add_lora
from ppdreambooth.modeling.lora_targets import (check_blocks_used, check_targets_found, denoiser_targets,
                                                module_patterns, set_block_learning_rates, text_encoder_targets)
from ppdreambooth.modeling.lycoris import LYCORIS_TYPES, add_lycoris, add_lycoris_convs, switch_adapters
from ppdreambooth.modeling.losses import MaskedLoss, dreambooth_loss
from ppdreambooth.modeling.pivotal import PivotalSpec, PivotalTokens

logger = logging.getLogger(__name__)
MAX_MEMOIZED_PROMPTS = 4096  # varied captions beyond this are encoded each time


def freeze(layer: paddle.nn.Layer) -> None:
    for param in layer.parameters():
        param.stop_gradient = True
    layer.eval()


def adapter_maker(lora: LoraSpec):
    """The function that adds `lora`'s kind of adapter: (layer, targets, rank, alpha, patterns=None) -> None, where
    `patterns` gives some modules (full names) their own (rank, alpha)."""
    if lora.lora_type in LYCORIS_TYPES:
        return lambda layer, targets, rank, alpha, patterns=None: add_lycoris(
            layer, targets, lora.lora_type, rank, alpha, lora.lokr_factor, patterns)
    return add_dora if lora.lora_type == "dora" else add_lora


def block_settings(lora: LoraSpec) -> Dict[str, tuple]:
    """The per-block flags `lora` sets, by flag name."""
    return {flag: entries for flag, entries in (("lora_block_ranks", lora.block_ranks),
                                                ("lora_block_alphas", lora.block_alphas),
                                                ("lora_block_lr", lora.block_lr)) if entries}


def add_denoiser_adapters(family: ModelFamily, denoiser: paddle.nn.Layer, lora: LoraSpec) -> None:
    """The denoiser's adapters as `lora` asks: its targets (a `--lora_layers` preset or names), per-block ranks
    and alphas, LoCon/LyCORIS on the convolutions (`--conv_rank`); block settings are checked against the
    denoiser's blocks first (`preflight` did so from its config.json when the model folder is local)."""
    blocks = block_settings(lora)
    check_blocks_for_model(blocks, family, denoiser.config, f"the model's {family.denoiser}")
    choice = ",".join(lora.denoiser_targets) or None
    targets = denoiser_targets(family, denoiser, choice)
    if choice not in (None, *DENOISER_PRESETS):
        check_targets_found(denoiser, targets)
    patterns = module_patterns(denoiser, targets, lora.rank, lora.alpha, lora.block_ranks, lora.block_alphas)
    adapter_maker(lora)(denoiser, targets, lora.rank, lora.alpha, patterns)
    if lora.conv_rank is not None:
        add_lycoris_convs(denoiser, lora.lora_type, lora.conv_rank, lora.conv_alpha, lora.lokr_factor)
    check_blocks_used(denoiser, blocks)


class DreamBoothModel(paddle.nn.Layer):
    """The trained network and what it needs around it, built from loaded `components` (subfolder name -> component,
    see `modeling.build.build_model`). `lora` adds adapters (None: full fine-tuning); `objective` is the family's
    noise/target/weighting (`modeling.objectives`); `with_prior_preservation`: batches are [instance; class] halves;
    `base_prediction_prior`: the class half repeats the instance latents under the class prompt and its target is
    the base model's own prediction (adapters off); `masked_loss`: the options of `--masked_loss`, whose batches
    carry `loss_mask`; `pivotal`: new tokens trained as textual inversion in every CLIP encoder (pivotal tuning,
    `modeling.pivotal`), held in the sub-layer `pivotal_tokens`."""

    def __init__(
        self,
        family: ModelFamily,
        components: Dict[str, object],
        objective,
        lora: Optional[LoraSpec] = None,
        train_text_encoder: bool = False,
        prior_loss_weight: float = 1.0,
        with_prior_preservation: bool = False,
        base_prediction_prior: bool = False,
        recompute: bool = False,
        memory_efficient_attention: bool = False,
        masked_loss: Optional[MaskedLoss] = None,
        pivotal: Optional[PivotalSpec] = None,
    ):
        super().__init__()
        self.masked_loss = masked_loss
        self._whole_model_training = False  # see train()
        self.family, self.objective, self.lora = family, objective, lora
        self.prior_loss_weight = prior_loss_weight
        self.with_prior_preservation = with_prior_preservation
        self.base_prediction_prior = base_prediction_prior
        self.tokenizers = {name: components[name] for name in family.tokenizers if name in components}
        denoiser = components[family.denoiser]
        if lora is not None:
            add_denoiser_adapters(family, denoiser, lora)
        family.freeze_unused(denoiser)
        if lora is not None:  # after freeze_unused: what it froze stays frozen
            set_block_learning_rates(denoiser, lora.block_lr)
        self.add_sublayer(family.denoiser, denoiser)
        # Components that never train live outside the Layer tree: AMP O2 (which casts every sub-layer)
        # leaves them in float32, and state_dict()/checkpoints never contain them.
        self._frozen: Dict[str, paddle.nn.Layer] = {"vae": components["vae"]}
        self._parked: set = set()  # frozen components moved to the CPU after caching their outputs
        freeze(components["vae"])
        for name in [n for n in family.text_encoders if n in components]:
            encoder = components[name]
            if train_text_encoder and family.is_trainable_text_encoder(name):
                if lora is not None:
                    adapter_maker(lora)(encoder, text_encoder_targets(family, lora.text_encoder_targets), lora.rank,
                                        lora.alpha)
                self.add_sublayer(name, encoder)
            else:
                freeze(encoder)
                self._frozen[name] = encoder
        if pivotal is not None:  # after the LoRA adapters: their random start is the same with and without it
            encoders = {n: components[n] for n in family.textual_inversion_keys}
            tokenizers = {n: components[family.tokenizers[family.text_encoders.index(n)]] for n in encoders}
            self.add_sublayer("pivotal_tokens", PivotalTokens(pivotal, encoders, tokenizers))
        vae_config = components["vae"].config
        self.scaling_factor = vae_config.scaling_factor
        self.shift_factor = vae_config.get("shift_factor", None) or 0.0  # SD3's VAE; SD/SDXL have none
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)  # pixels per latent cell, each side
        if recompute:
            self.enable_recompute()
        if memory_efficient_attention:
            self.denoiser.enable_xformers_memory_efficient_attention()

    def __getattr__(self, name: str):
        """Components by subfolder name: trained ones are sub-layers, frozen ones and tokenizers are not."""
        for table in ("_frozen", "tokenizers"):
            held = self.__dict__.get(table)
            if held is not None and name in held:
                return held[name]
        return super().__getattr__(name)

    @property
    def denoiser(self) -> paddle.nn.Layer:
        return self._sub_layers[self.family.denoiser]

    @property
    def pivotal_tokens(self) -> Optional[PivotalTokens]:
        """The new tokens of pivotal tuning (--train_text_encoder_ti), or None."""
        return self._sub_layers.get("pivotal_tokens")

    @property
    def noise_scheduler(self):
        return self.objective.noise_scheduler

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type

    def text_encoders(self) -> Dict[str, paddle.nn.Layer]:
        """Every text encoder the model still holds, trained or frozen, by subfolder name."""
        return {name: getattr(self, name) for name in self.family.text_encoders if self.has_component(name)}

    # ----- set-up -------------------------------------------------------------------------------
    def enable_recompute(self) -> None:
        """Gradient checkpointing in the denoiser and in every trained text encoder."""
        self.family.enable_recompute(self.denoiser)
        for encoder in self.trained_text_encoders():
            encoder.gradient_checkpointing_enable()

    def trained_text_encoders(self) -> List[paddle.nn.Layer]:
        return [self._sub_layers[n] for n in self.family.text_encoders if n in self._sub_layers]

    def trained_layers(self) -> Dict[str, paddle.nn.Layer]:
        """The denoiser and every trained text encoder, by component name (what LoRA adapters are saved from)."""
        return {name: layer for name, layer in self._sub_layers.items() if name != "pivotal_tokens"}

    def trainable_named_parameters(self) -> List[Tuple[str, paddle.Tensor]]:
        return [(n, p) for n, p in self.named_parameters() if not p.stop_gradient]

    def trainable_parameters(self) -> List[paddle.Tensor]:
        return [p for _, p in self.trainable_named_parameters()]

    def text_encoder_parameters(self) -> List[paddle.Tensor]:
        """Trained parameters of every text encoder, selected by the layer they belong to."""
        return [p for encoder in self.trained_text_encoders() for p in encoder.parameters() if not p.stop_gradient]

    def set_text_encoder_learning_rate(self, learning_rate: float, text_encoder_learning_rate: Optional[float]) -> None:
        """Give trained text-encoder weights their own rate, as a multiplier of the scheduler's rate.

        Paddle multiplies the rate by each parameter's `optimize_attr["learning_rate"]`. Parameter groups
        would do the same, but Paddle clips gradients per group, not over all of them: the optimizer must
        get one list so that `--max_grad_norm` clips the global norm, as the plain training loop does.
        """
        ratio = 1.0
        if text_encoder_learning_rate is not None:
            ratio = text_encoder_learning_rate / learning_rate if learning_rate else 0.0
        for param in self.text_encoder_parameters():
            param.optimize_attr["learning_rate"] = ratio
        if self.pivotal_tokens is not None:  # the new tokens are text-encoder weights too
            self.pivotal_tokens.set_learning_rate_ratio(ratio)

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
        return name in self._frozen or name in self._sub_layers or name in self.tokenizers

    # ----- the training step ---------------------------------------------------------------------
    @paddle.no_grad()
    def latent_moments(self, pixel_values: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Mean and standard deviation of the VAE's latent distribution, in float32."""
        with paddle.amp.auto_cast(enable=False):
            dist = self.vae.encode(pixel_values.astype(self.vae.dtype)).latent_dist
            return dist.mean.astype("float32"), dist.std.astype("float32")

    def sample_latents(self, mean: paddle.Tensor, std: paddle.Tensor) -> paddle.Tensor:
        """A shifted, scaled latent sample; draws from the RNG exactly as the VAE's own `latent_dist.sample()`."""
        return (mean + std * paddle.randn(mean.shape, dtype="float32") - self.shift_factor) * self.scaling_factor

    @paddle.no_grad()
    def base_prediction_target(self, target, noisy_latents, timesteps, conditioning):
        """The target with its class half replaced by the base model's prediction there (adapters off)."""
        n = target.shape[0] // 2
        rows = {k: v[n:] for k, v in conditioning.items()}
        self.adapters_on(False)
        try:
            raw = self.family.predict(self.denoiser, noisy_latents[n:].astype(self.denoiser.dtype), timesteps[n:], rows)
        finally:
            self.adapters_on(True)
        with paddle.amp.auto_cast(enable=False):
            base = self.objective.prediction(raw.astype("float32"), noisy_latents[n:], timesteps[n:])
        return paddle.concat([target[:n], base.astype(target.dtype)])

    def adapters_on(self, on: bool) -> None:
        """The denoiser's adapters on or off (off: the base denoiser)."""
        switch_adapters(self.denoiser, on)  # LoHa/LoKr, and LoCon's convolution adapters of a LoRA run
        if self.lora is not None and self.lora.lora_type not in LYCORIS_TYPES:  # peft's LoRA / DoRA layers
            self.denoiser.enable_adapters() if on else self.denoiser.disable_adapters()

    def encode_missing_rows(self, pixel_values, latent_mean, latent_std, latent_cached):
        """Moments of a mixed batch: the cached rows as given, the others encoded now."""
        rows = paddle.nonzero(paddle.logical_not(latent_cached.astype("bool"))).flatten()
        mean, std = self.latent_moments(paddle.gather(pixel_values, rows))
        return paddle.scatter(latent_mean, rows, mean), paddle.scatter(latent_std, rows, std)

    def encode_images(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return self.sample_latents(*self.latent_moments(pixel_values))

    def tokenize(self, prompt: str) -> dict:
        """Token ids of `prompt` for every tokenizer of the family (numpy, one row)."""
        return self.family.tokenize(self.tokenizers, prompt)

    def prompts_train(self) -> bool:
        """True while a prompt's encoding depends on weights being trained (text encoders, or new tokens not frozen
        yet): its gradient is needed and it cannot be cached."""
        return bool(self.trained_text_encoders()) or (self.pivotal_tokens is not None and not self.pivotal_tokens.frozen)

    def memoize_prompts(self) -> None:
        """From now on encode each distinct prompt once and serve it again from memory, as long as nothing in the
        text encoders trains (pivotal tuning, once its tokens freeze). Each prompt is encoded on its own, so the
        values depend only on the prompt (not on the batch or on when the memo started: a resume gets the same)."""
        self._prompt_memo = {}

    @paddle.no_grad()
    def _encode_memoized(self, tokens: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        rows = []
        for i in range(next(iter(tokens.values())).shape[0]):
            row = {k: v[i : i + 1] for k, v in tokens.items()}
            key = b"".join(row[k].numpy().tobytes() for k in sorted(row))
            encoded = self._prompt_memo.get(key)
            if encoded is None:
                with paddle.amp.auto_cast(enable=False):
                    encoded = self.family.encode_prompt(self.text_encoders(), row, self.denoiser.config)
                if len(self._prompt_memo) < MAX_MEMOIZED_PROMPTS:
                    self._prompt_memo[key] = encoded
            rows.append(encoded)
        return {k: paddle.concat([r[k] for r in rows]) for k in rows[0]}

    def encode_prompts(self, tokens: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
        """The family's prompt conditioning (`prompt_embeds`, maybe `pooled_prompt_embeds`) for token ids."""
        config = self.denoiser.config
        if self.__dict__.get("_prompt_memo") is not None and not self.prompts_train():
            return self._encode_memoized(tokens)
        if self.prompts_train():
            return self.family.encode_prompt(self.text_encoders(), tokens, config)
        with paddle.no_grad(), paddle.amp.auto_cast(enable=False):
            return self.family.encode_prompt(self.text_encoders(), tokens, config)

    def train(self, mode: bool = True):
        """Training (or eval) mode for every sublayer; a no-op when the whole model is already in training mode.

        PaddleNLP's Trainer calls `model.train()` before every step, which walks all ~1,000 sublayers of even
        the tiny SD model each time; the mode changes only around sampling, which goes through `eval()`/`train()`
        here."""
        if mode and self._whole_model_training:
            return self
        result = super().train(mode)
        self._whole_model_training = mode
        return result

    def eval(self):
        self._whole_model_training = False
        return super().eval()

    def forward(self, pixel_values: Optional[paddle.Tensor] = None, input_ids: Optional[paddle.Tensor] = None,
                **batch: paddle.Tensor) -> Dict[str, paddle.Tensor]:
        """Loss for a batch of [instance; class] examples (`ppdreambooth.batch` defines its keys): images as pixels
        or cached latent moments, prompts as token ids or cached encodings, plus the family's per-sample
        conditioning (SDXL: `time_ids`). `noise`/`timesteps` may be given (tests; --ip_noise_gamma still perturbs
        the input made with that noise). With `latent_cached` (a row mask) only the rows without cached moments are
        encoded. `loss_mask` (--masked_loss) weights the loss per latent cell."""
        if input_ids is not None:
            batch[token_key(0)] = input_ids
        latent_mean, latent_std, latent_cached, prompt_embeds, noise, timesteps, loss_mask = (
            batch.pop(key, None)
            for key in (LATENT_MEAN, LATENT_STD, LATENT_CACHED, PROMPT_EMBEDS, NOISE, TIMESTEPS, LOSS_MASK))
        tokens = {k: batch.pop(k) for k in [k for k in batch if is_token_key(k)]}
        conditioning = batch  # what remains: pooled embeddings, the family's geometry conditioning
        if self.base_prediction_prior:  # the class half repeats the instance half: encode and noise that once
            half = lambda x: None if x is None else x[: x.shape[0] // 2]  # noqa: E731
            pixel_values, latent_mean, latent_std, latent_cached = map(
                half, (pixel_values, latent_mean, latent_std, latent_cached))
            noise, timesteps = half(noise), half(timesteps)
        if latent_mean is None:
            latent_mean, latent_std = self.latent_moments(pixel_values)
        elif latent_cached is not None:
            latent_mean, latent_std = self.encode_missing_rows(pixel_values, latent_mean, latent_std, latent_cached)
        with paddle.amp.auto_cast(enable=False):  # latents, noise and the noise schedule in float32
            latents = self.sample_latents(latent_mean, latent_std)
            if noise is None or timesteps is None:
                drawn_noise, drawn_steps = self.objective.draw(latents)
                noise = drawn_noise if noise is None else noise
                timesteps = drawn_steps if timesteps is None else timesteps
            input_noise = self.objective.input_noise(noise)  # --ip_noise_gamma perturbs the input, not the target
            if self.base_prediction_prior:  # both halves see the same noisy input
                latents, noise, input_noise, timesteps = (
                    paddle.concat([x, x]) for x in (latents, noise, input_noise, timesteps))
            noisy_latents = self.objective.noisy_latents(latents, input_noise, timesteps)
            target = self.objective.target(latents, noise, timesteps)
        if prompt_embeds is None:
            conditioning.update(self.encode_prompts(tokens))
        else:
            conditioning[PROMPT_EMBEDS] = prompt_embeds
        dtype = self.denoiser.dtype
        conditioning = {k: v.astype(dtype) for k, v in conditioning.items()}
        raw = self.family.predict(self.denoiser, noisy_latents.astype(dtype), timesteps, conditioning)
        if self.base_prediction_prior:
            target = self.base_prediction_target(target, noisy_latents, timesteps, conditioning)
        with paddle.amp.auto_cast(enable=False):
            model_pred = self.objective.prediction(raw, noisy_latents, timesteps)
            weights = self.objective.loss_weights(timesteps)
            thresholds = self.objective.huber_threshold(timesteps)  # None for the l2 loss
            batch = latents.shape[0]
            num_instance = batch // 2 if self.with_prior_preservation else batch
            return dreambooth_loss(model_pred, target, num_instance, self.prior_loss_weight, weights,
                                   self.objective.loss_type, thresholds, loss_mask, self.masked_loss or MaskedLoss())
