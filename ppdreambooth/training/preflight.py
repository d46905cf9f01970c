"""Every check a run makes before it loads a model: the model path and family, the options the family can
honour, the photos, the output folder (one run per folder, no finished model overwritten) and the
checkpoint to resume from (verified against its checksums).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import paddle

from ppdreambooth.errors import ConfigError
from ppdreambooth.config.arguments import (
    DataArguments,
    DreamBoothTrainingArguments,
    ModelArguments,
    base_prediction_prior_problem,
)
from ppdreambooth.config.lora_blocks import (BLOCK_FLAGS, block_counts, check_block_counts, check_block_kind,
                                             parse_block_values)
from ppdreambooth.data.masks import with_masks
from ppdreambooth.data.photos import Photo, collect_photos, read_caption
from ppdreambooth.evaluation.prompts import subject_words
from ppdreambooth.evaluation.world import world_subject
from ppdreambooth.families import ModelFamily, detect_family
from ppdreambooth.families.checks import (
    check_model_files,
    check_model_folder,
    check_model_path,
    check_single_file,
    check_tokenizer_path,
    check_vae_path,
)
from ppdreambooth.modeling.lora import LORA_WEIGHTS_NAME
from ppdreambooth.modeling.lycoris import LYCORIS_TYPES, lycoris_export_problem
from ppdreambooth.training.folders import check_folders_apart, check_writable
from ppdreambooth.training.resume_settings import check_resume, class_files_now, current_settings
from ppdreambooth.training.run_folder import check_output_dir, claim_output_dir, resolve_resume

logger = logging.getLogger("ppdreambooth")


@dataclass
class CheckedInputs:
    """What the checks found: the model family, the checkpoint to resume from (or None) and each concept's photos,
    decoded once here (`take_photos` hands them over, so that nothing else keeps the full-size images alive)."""

    family: ModelFamily
    resume: Optional[str]
    instance_photos: Optional[List[List[Photo]]]

    def take_photos(self) -> List[List[Photo]]:
        photos, self.instance_photos = self.instance_photos, None
        return photos


def check_inputs(model_args: ModelArguments, data_args: DataArguments, args: DreamBoothTrainingArguments
                 ) -> CheckedInputs:
    """Every check that needs no model."""
    config_source = check_model_path(model_args.pretrained_model_name_or_path, model_args.single_file_config)
    if config_source != model_args.pretrained_model_name_or_path:
        check_single_file(model_args.pretrained_model_name_or_path)
    family = detect_family(config_source, model_args.model_family, model_args.revision)
    check_model_folder(config_source, family)
    check_model_files(config_source, family)
    if model_args.pretrained_vae_model_name_or_path:
        check_vae_path(model_args.pretrained_vae_model_name_or_path)
    if model_args.tokenizer_name:
        check_tokenizer_path(model_args.tokenizer_name)
    check_lora_targets(family, model_args, config_source)
    check_family_options(family, model_args, data_args, args)
    if model_args.train_text_encoder_ti:
        check_pivotal(family, model_args, data_args, args, config_source)
    if args.eval_world:  # the subject must be one the toy world can score
        world_subject(*subject_words(data_args.concept_list[0].instance_prompt, args.eval_class_name))
    class_images = data_args.with_prior_preservation and data_args.prior_preservation_mode == "class_images"
    check_folders_apart(data_args.concept_list, args.output_dir, class_images)
    instance_photos = [collect_photos(c.instance_data_dir, "instance_data_dir") for c in data_args.concept_list]
    if args.fp16 and paddle.get_device().startswith("cpu"):
        raise ConfigError("--fp16 (--mixed_precision fp16) needs a GPU: Paddle's CPU build has no float16 training "
                          "(its loss scaler fails on the first step). On a CPU use --mixed_precision bf16, or no.")
    if args.enable_xformers_memory_efficient_attention:
        from ppdiffusers.utils import is_ppxformers_available

        if not is_ppxformers_available():
            raise ConfigError(
                "--enable_xformers_memory_efficient_attention needs a GPU build of PaddlePaddle with "
                "memory-efficient attention; this installation has none. Drop the flag."
            )
    for concept, files in zip(data_args.concept_list, instance_photos):  # captions are read later: check now
        for photo in files:
            read_caption(photo.path, data_args.caption_extension, concept.instance_prompt)
    if data_args.masked_loss:  # every photo's mask, found, read and sized now
        instance_photos = [
            with_masks(files, concept.instance_mask_dir, data_args.alpha_mask,
                       f" ({concept.instance_data_dir})" if len(instance_photos) > 1 else "")
            for concept, files in zip(data_args.concept_list, instance_photos)]
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ConfigError(f"--output_dir {args.output_dir} is a file, not a folder: choose another --output_dir.")
    if args.process_index <= 0:
        check_writable(args.output_dir)
    claim_output_dir(args)  # one run per output folder (the lock is dropped when `run` ends)
    resume = resolve_resume(args)
    check_output_dir(args, resume)
    if resume is not None:
        check_resume(resume, current_settings(model_args, args, family, [[p.path for p in photos] for photos in
                                                                           instance_photos],
                                              class_files_now(data_args.concept_list, class_images)))
    return CheckedInputs(family, resume, instance_photos)


def check_lora_targets(family: ModelFamily, model_args: ModelArguments, config_source: str) -> None:
    """--text_encoder_lora_layers where the family has text-encoder adapters, and the --lora_block_* flags in the
    family's block naming and within the denoiser's blocks (from its config.json when the folder is local; a hub
    model is checked when it is built)."""
    if not model_args.use_lora:
        return
    chosen = model_args.text_encoder_lora_layers
    if chosen not in (None, "attn") and not family.text_encoder_mlp_targets:
        reason = family.unsupported_options.get("lora_text_encoder", "this family has no text-encoder adapters.")
        raise ConfigError(f"--text_encoder_lora_layers {chosen}: {reason}")
    settings = {flag: parse_block_values(flag, getattr(model_args, flag)) for flag in BLOCK_FLAGS}
    settings = {flag: entries for flag, entries in settings.items() if entries}
    if not settings:
        return
    for flag, entries in settings.items():
        check_block_kind(flag, entries, family.name, family.lora_blocks_numbered)
    config_path = os.path.join(config_source, family.denoiser, "config.json")
    if os.path.isfile(config_path):
        import json

        with open(config_path, encoding="utf-8") as f:
            counts = block_counts(json.load(f))
        for flag, entries in settings.items():
            check_block_counts(flag, entries, counts, f"{config_source}'s {family.denoiser}")


def check_family_options(family: ModelFamily, model_args: ModelArguments, data_args: DataArguments,
                         args: DreamBoothTrainingArguments) -> None:
    """Refuse, before any weights load, what this family cannot do, naming the flag and what to do."""
    unsupported = dict(family.unsupported_options)
    if model_args.pretrained_model_name_or_path.endswith(".safetensors") and "single_file" in unsupported:
        raise ConfigError(f"training from a single-file checkpoint: {unsupported['single_file']}")
    if model_args.use_lora and model_args.conv_rank is not None and "conv_rank" in unsupported:
        raise ConfigError(f"--conv_rank: {unsupported['conv_rank']}")
    for fmt in args.export_format_list:
        lycoris = model_args.use_lora and model_args.lora_type in LYCORIS_TYPES
        problem = lycoris_export_problem(fmt, model_args.lora_type, family.name) if lycoris else ""
        if problem:
            raise ConfigError(f"--export_formats {fmt}: {problem}")
        if fmt == "diffusers" and model_args.use_lora and model_args.conv_rank is not None:
            from ppdreambooth.interop.exports import LOCON_DIFFUSERS

            raise ConfigError(f"--export_formats diffusers: {LOCON_DIFFUSERS}")
        if f"export_{fmt}" in unsupported:
            raise ConfigError(f"--export_formats {fmt}: {unsupported[f'export_{fmt}']}")
    if data_args.prior_preservation_mode == "base_prediction":
        problem = base_prediction_prior_problem(model_args.use_lora, model_args.train_text_encoder)
        if problem:
            raise ConfigError(problem)
    if model_args.use_lora and model_args.train_text_encoder and "lora_text_encoder" in unsupported:
        raise ConfigError(f"--use_lora with --train_text_encoder: {unsupported['lora_text_encoder']}")
    flow = family.objective == "flow"
    if flow:
        given = [name for name in ModelArguments.DDPM_ONLY if getattr(model_args, name)]
        if given:
            raise ConfigError(f"--{given[0]} {unsupported['ddpm_options']}")
        if model_args.loss_type != "l2" and model_args.huber_schedule == "snr":
            raise ConfigError(f"--loss_type {model_args.loss_type} with --huber_schedule snr (the default): "
                              f"{unsupported['huber_schedule_snr']}")
    else:
        given = [name for name in ModelArguments.FLOW_ONLY if getattr(model_args, name) is not None]
        if given or model_args.drop_t5:
            flag = given[0] if given else "drop_t5"
            raise ConfigError(f"--{flag} is a flow-matching (SD3) option; {model_args.pretrained_model_name_or_path} "
                              f"is a {family.name} model trained as DDPM (use --snr_gamma, --prediction_type, "
                              "--noise_offset there).")
    step = family.resolution_multiple
    sides = {"resolution": data_args.resolution, "height": data_args.height, "width": data_args.width}
    if data_args.enable_bucket:
        sides.update(bucket_reso_steps=data_args.bucket_reso_steps)
    for name, value in sides.items():
        if value is not None and value % step:
            raise ConfigError(f"--{name} {value}: {family.name} needs image sides that are multiples of {step}.")


def check_pivotal(family: ModelFamily, model_args: ModelArguments, data_args: DataArguments,
                  args: DreamBoothTrainingArguments, model_folder: str) -> None:
    """--train_text_encoder_ti: the abstraction in an instance prompt, a freeze step after step 0, and token
    strings that the (local) tokenizers do not already have."""
    import json

    from ppdreambooth.modeling.pivotal import spec_from_arguments

    spec = spec_from_arguments(model_args)
    if not any(spec.appears_in(c.instance_prompt) for c in data_args.concept_list):
        raise ConfigError(f"--token_abstraction {spec.token_abstraction!r} does not appear (as a word) in the "
                          f"instance prompt {data_args.concept_list[0].instance_prompt!r}: pivotal tuning replaces "
                          "that word by the new tokens. Pass the identifier of your prompt, e.g. --token_abstraction "
                          "sks for 'a photo of sks dog'.")
    if args.max_steps > 0 and spec.freeze_step(args.max_steps) == 0:
        raise ConfigError(f"--train_text_encoder_ti_frac {spec.train_fraction} of {args.max_steps} steps freezes the "
                          "new tokens at step 0, before they train: raise the fraction or the number of steps.")
    folders = [os.path.join(model_folder, name) for name in family.tokenizers[:len(family.textual_inversion_keys)]]
    if model_args.tokenizer_name:
        folders[0] = model_args.tokenizer_name
    for folder in folders:
        known = set()
        for file_name in ("vocab.json", "added_tokens.json"):
            path = os.path.join(folder, file_name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    known.update(json.load(f))
        clash = [t for t in spec.tokens if t in known]
        if clash:
            raise ConfigError(f"--train_text_encoder_ti: the tokenizer {folder} already has {', '.join(clash)}; the "
                              "new tokens need strings of their own. Train from a model without those tokens (not "
                              "the output of an earlier pivotal-tuning run).")

