"""What a checkpoint was trained with, so that resuming with other settings says what changed instead of failing
on a shape mismatch (or silently training something else).

Each checkpoint holds `run_settings.json` (written before its completion marker, so it is checksummed with the
rest). Settings that decide the shape or meaning of the saved state must match to resume: the family, the base
model and VAE, LoRA or full and the adapters' type (LoRA/DoRA), rank, alpha and targets (denoiser and text encoders),
the per-block ranks, alphas and learning-rate multipliers, a trained text encoder,
pivotal tuning and its number of new tokens, T5
dropped, the precision, the optimizer, EMA, and the number of processes (each has its own RNG state and data
shard). Anything else — learning rate, steps, logging, validation — may change freely. Photos added or removed since the checkpoint
do not stop the run, but the data order then differs from the run that wrote it, and the user is told so.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

from ppdreambooth.data.images import list_image_files
from ppdreambooth.errors import ConfigError

logger = logging.getLogger("ppdreambooth")
SETTINGS_NAME = "run_settings.json"
# setting -> how the user changes it
MUST_MATCH = {
    "family": "--model_family",
    "base_model": "--pretrained_model_name_or_path",
    "vae": "--pretrained_vae_model_name_or_path",
    "use_lora": "--use_lora",
    "lora_type": "--lora_type",
    "lora_rank": "--lora_rank",
    "lora_alpha": "--lora_alpha",
    "lora_layers": "--lora_layers",
    "text_encoder_lora_layers": "--text_encoder_lora_layers",
    "lora_block_ranks": "--lora_block_ranks",
    "lora_block_alphas": "--lora_block_alphas",
    "lora_block_lr": "--lora_block_lr",
    "lokr_factor": "--lokr_factor",
    "conv_rank": "--conv_rank",
    "conv_alpha": "--conv_alpha",
    "train_text_encoder": "--train_text_encoder",
    "train_text_encoder_ti": "--train_text_encoder_ti",
    "num_new_tokens_per_abstraction": "--num_new_tokens_per_abstraction",
    "drop_t5": "--drop_t5",
    "precision": "--mixed_precision",
    "optim": "--optim",
    "use_ema": "--use_ema",
    "processes": "the number of processes",
}


def _model_path(path: Optional[str]) -> Optional[str]:
    return os.path.realpath(path) if path and os.path.exists(path) else path


def file_list(files: Sequence[str]) -> List[List]:
    """[name, bytes] of each file: enough to notice photos added, removed or replaced."""
    return [[os.path.basename(path), os.path.getsize(path)] for path in files if os.path.exists(path)]


def _blocks(flag: str, model_args) -> Optional[str]:
    from ppdreambooth.config.lora_blocks import describe, parse_block_values

    entries = parse_block_values(flag, getattr(model_args, flag, None))
    return describe(sorted(entries, key=lambda e: (e.part, -1 if e.first is None else e.first))) or None


def current_settings(model_args, args, family, instance_files: Sequence[Sequence[str]],
                     class_files: Sequence[Sequence[str]]) -> dict:
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "no"
    lora = model_args.use_lora
    return {
        "family": family.name,
        "base_model": _model_path(model_args.pretrained_model_name_or_path),
        "vae": _model_path(model_args.pretrained_vae_model_name_or_path),
        "use_lora": lora,
        "lora_type": model_args.lora_type if lora else None,
        "lora_rank": model_args.lora_rank if lora else None,
        "lora_alpha": model_args.lora_alpha if lora else None,
        "lora_layers": (None if model_args.lora_layers == "attn" else model_args.lora_layers) if lora else None,
        "text_encoder_lora_layers": ((model_args.text_encoder_lora_layers or "attn")
                                     if lora and model_args.train_text_encoder else None),
        # the block flags as parsed (spacing and order do not count); a block's learning-rate multiplier must
        # match too: at 0 its adapters are frozen and absent from the checkpoint and the optimizer state
        "lora_block_ranks": _blocks("lora_block_ranks", model_args) if lora else None,
        "lora_block_alphas": _blocks("lora_block_alphas", model_args) if lora else None,
        "lora_block_lr": _blocks("lora_block_lr", model_args) if lora else None,
        "lokr_factor": model_args.lokr_factor if lora and model_args.lora_type == "lokr" else None,
        "conv_rank": model_args.conv_rank if lora else None,
        "conv_alpha": model_args.conv_alpha if lora else None,
        "train_text_encoder": model_args.train_text_encoder,
        "train_text_encoder_ti": model_args.train_text_encoder_ti,
        "num_new_tokens_per_abstraction": (model_args.num_new_tokens_per_abstraction
                                           if model_args.train_text_encoder_ti else None),
        "drop_t5": model_args.drop_t5,
        "precision": precision if precision == "no" else f"{precision} {args.fp16_opt_level}",
        "optim": str(getattr(args.optim, "value", args.optim)),
        "use_ema": args.use_ema,
        "processes": max(args.world_size, 1),
        "data": {"instance": [file_list(files) for files in instance_files],
                 "class": [file_list(files) for files in class_files]},
    }


def class_files_now(concepts, class_images: bool) -> List[List[str]]:
    """The class images each concept's folder holds now (none without class-image prior preservation)."""
    return [list_image_files(c.class_data_dir) if class_images and c.class_data_dir and
            os.path.isdir(c.class_data_dir) else [] for c in concepts]


def write_settings(checkpoint_dir: str, settings: dict) -> None:
    with open(os.path.join(checkpoint_dir, SETTINGS_NAME), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)


def read_settings(checkpoint_dir: str) -> Optional[dict]:
    path = os.path.join(checkpoint_dir, SETTINGS_NAME)
    if not os.path.isfile(path):
        return None  # written by an older ppdreambooth
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _shown(value) -> str:
    if value is None or value is False:
        return "not set" if value is None else "off"
    return "on" if value is True else str(value)


def differences(saved: dict, current: dict, name: str) -> Tuple[List[str], List[str]]:
    """(what stops the resume, what only warns), each in words naming the setting and both values."""
    errors = [f"{MUST_MATCH[key]} is {_shown(current.get(key))} but {name} was trained with {_shown(saved.get(key))}"
              for key in MUST_MATCH if key in saved and saved.get(key) != current.get(key)]
    warnings = []
    for role in ("instance", "class"):
        before, now = saved.get("data", {}).get(role, []), current.get("data", {}).get(role, [])
        for n, (old, new) in enumerate(zip(before, now)):
            old_set, new_set = {tuple(x) for x in old}, {tuple(x) for x in new}
            if old_set != new_set and (role == "instance" or new):
                added = sorted(f for f, _ in new_set - old_set)
                removed = sorted(f for f, _ in old_set - new_set)
                warnings.append(f"the {role} images of concept {n + 1} changed since {name} (added or replaced: "
                                f"{', '.join(added) or 'none'}; removed or replaced: {', '.join(removed) or 'none'})")
        if len(before) != len(now):
            warnings.append(f"{name} was trained on {len(before)} concept(s), this run has {len(now)}")
    return errors, warnings


def check_resume(checkpoint_dir: str, current: dict) -> None:
    """Stop before any weights load when `checkpoint_dir` was trained with settings that must match; warn when
    its data changed."""
    saved = read_settings(checkpoint_dir)
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    if saved is None:
        logger.info("%s records no settings (an older ppdreambooth): resuming without comparing them", name)
        return
    errors, warnings = differences(saved, current, name)
    if errors:
        raise ConfigError(f"--resume_from_checkpoint {name} cannot continue with these settings: "
                          + "; ".join(errors) + ". Resume with the settings it was trained with, or start a new run "
                          "in another --output_dir.")
    for warning in warnings:
        logger.warning("%s: training resumes, but the order of examples from here on differs from the run that "
                       "wrote the checkpoint (an exact resume no longer holds)", warning)


__all__: List[str] = ["SETTINGS_NAME", "check_resume", "current_settings", "write_settings"]
