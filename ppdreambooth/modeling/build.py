"""From the model arguments to a `DreamBoothModel`: detect the family, load its components (tokenizers sized to
their encoders), build the objective and the LoRA settings. The model itself takes only these values."""
from __future__ import annotations

from typing import Optional

from ppdreambooth.config.arguments import ModelArguments, base_prediction_prior_problem
from ppdreambooth.config.lora_blocks import parse_block_values
from ppdreambooth.errors import ConfigError
from ppdreambooth.families import ModelFamily, detect_family
from ppdreambooth.families.loading import load_components
from ppdreambooth.modeling.losses import MaskedLoss
from ppdreambooth.modeling.lora import LoraSpec
from ppdreambooth.modeling.model import DreamBoothModel
from ppdreambooth.modeling.objectives import LossVariants, build_objective
from ppdreambooth.modeling.pivotal import spec_from_arguments


def fit_tokenizers(family: ModelFamily, components: dict, model_args: ModelArguments) -> None:
    """--tokenizer_name replaces the first tokenizer; every tokenizer pads to its encoder's window (some saved
    tokenizers say "unlimited", 1e30), T5 (relative positions) to --max_sequence_length."""
    if model_args.tokenizer_name:
        from ppdiffusers.transformers import CLIPTokenizer

        components[family.tokenizers[0]] = CLIPTokenizer.from_pretrained(model_args.tokenizer_name)
    for name, encoder in zip(family.tokenizers, family.text_encoders):
        if name not in components:
            continue
        tokenizer = components[name]
        limit = getattr(components[encoder].config, "max_position_embeddings", None)
        if limit:  # CLIP: its position table
            tokenizer.model_max_length = min(tokenizer.model_max_length, limit)
        else:
            tokenizer.model_max_length = model_args.max_sequence_length


def loss_variants(model_args: ModelArguments) -> LossVariants:
    """The loss and noise variants the flags ask for (README "Loss and noise variants")."""
    return LossVariants(
        loss_type=model_args.loss_type,
        huber_schedule=model_args.huber_schedule,
        huber_c=model_args.huber_c,
        min_timestep=model_args.min_timestep,
        max_timestep=model_args.max_timestep,
        multires_noise_iterations=model_args.multires_noise_iterations,
        multires_noise_discount=model_args.multires_noise_discount,
        adaptive_noise_scale=model_args.adaptive_noise_scale,
        ip_noise_gamma=model_args.ip_noise_gamma,
        debiased_estimation_loss=model_args.debiased_estimation_loss,
    )


def build_model(
    model_args: ModelArguments,
    with_prior_preservation: bool = False,
    recompute: bool = False,
    memory_efficient_attention: bool = False,
    family: Optional[ModelFamily] = None,
    base_prediction_prior: bool = False,
    masked_loss: Optional[MaskedLoss] = None,
) -> DreamBoothModel:
    """Load the model `model_args` names and wrap it for DreamBooth training."""
    if base_prediction_prior:
        problem = base_prediction_prior_problem(model_args.use_lora, model_args.train_text_encoder,
                                                with_prior_preservation)
        if problem:
            raise ConfigError(problem)
    path, revision = model_args.pretrained_model_name_or_path, model_args.revision
    family = family or detect_family(path, model_args.model_family, revision)
    skip = ("text_encoder_3", "tokenizer_3") if model_args.drop_t5 else ()
    components = load_components(path, family, revision, model_args.pretrained_vae_model_name_or_path, skip)
    fit_tokenizers(family, components, model_args)
    lora = None
    if model_args.use_lora:
        targets = tuple(model_args.lora_layers.split(",")) if model_args.lora_layers else ()
        lora = LoraSpec(model_args.lora_rank, model_args.lora_alpha, targets, model_args.lora_type,
                        model_args.lokr_factor, model_args.conv_rank, model_args.conv_alpha,
                        text_encoder_targets=model_args.text_encoder_lora_layers,
                        block_ranks=parse_block_values("lora_block_ranks", model_args.lora_block_ranks),
                        block_alphas=parse_block_values("lora_block_alphas", model_args.lora_block_alphas),
                        block_lr=parse_block_values("lora_block_lr", model_args.lora_block_lr))
    return DreamBoothModel(
        family,
        components,
        build_objective(family.objective, components["scheduler"], model_args.prediction_type,
                        model_args.noise_offset, model_args.snr_gamma, model_args.weighting_scheme,
                        model_args.logit_mean, model_args.logit_std, model_args.mode_scale,
                        model_args.precondition_outputs, loss_variants(model_args)),
        lora=lora,
        train_text_encoder=model_args.train_text_encoder,
        prior_loss_weight=model_args.prior_loss_weight,
        with_prior_preservation=with_prior_preservation,
        base_prediction_prior=base_prediction_prior,
        recompute=recompute,
        memory_efficient_attention=memory_efficient_attention,
        masked_loss=masked_loss,
        pivotal=spec_from_arguments(model_args),
    )
