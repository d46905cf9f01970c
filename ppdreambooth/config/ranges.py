"""The valid range of every numeric flag, stated once.

Each argument dataclass checks its own numeric fields against this table when it is built (so a JSON config, the
command line and code that builds the arguments directly are all checked the same way), and `parse_args` checks
the seed script's alias flags before folding them, so the message names the flag the user typed. A value outside
its range, NaN, infinity or a number too large to mean anything stops the run before any model is loaded with a
message naming the flag, the value and the range. `tests/test_ranges.py` drives the parser with generated values
for every numeric flag and requires a table entry for each.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ppdreambooth.errors import ConfigError

HUGE = 10**9  # more steps, images or workers than any run has


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # the low end itself is not allowed
    high_open: bool = False
    special: Tuple[float, ...] = ()  # values outside [low, high] that have a documented meaning (see `note`)
    note: str = ""

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.special:
            return True
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"> {self._number(self.low)}" if self.low_open else f">= {self._number(self.low)}"
        high = f"< {self._number(self.high)}" if self.high_open else f"<= {self._number(self.high)}"
        text = f"{kind} {low} and {high}"
        if self.special:
            text += " (or " + ", ".join(self._number(v) for v in self.special) + f": {self.note})"
        elif self.note:
            text += f" ({self.note})"
        return text


    def _number(self, value: float) -> str:
        return f"{int(value):,}" if self.integer else f"{value:g}"


def count(low: int = 1, high: int = HUGE, **kw) -> Range:
    return Range(low, high, integer=True, **kw)


def positive(high: float, **kw) -> Range:
    return Range(0.0, high, low_open=True, **kw)


def share(**kw) -> Range:
    return Range(0.0, 1.0, **kw)


PIXELS = count(8, 16384, note="a multiple of 8")
RANGES: Dict[str, Range] = {
    # model and loss
    "lora_rank": count(1, 4096),
    "num_new_tokens_per_abstraction": count(1, 75, note="a CLIP prompt holds 75 tokens"),
    "train_text_encoder_ti_frac": Range(0.0, 1.0, low_open=True),
    "rank": count(1, 4096),
    "lora_alpha": positive(1e6),
    "conv_rank": count(1, 4096),
    "conv_alpha": positive(1e6),
    "lokr_factor": count(1, 4096, special=(-1,), note="-1: split each dimension near its square root"),
    "prior_loss_weight": Range(0.0, 1e3, note="0 trains without the prior term"),
    "noise_offset": Range(0.0, 1.0, note="0 is off"),
    "snr_gamma": positive(1e3),
    "logit_mean": Range(-10.0, 10.0),
    "logit_std": positive(10.0),
    "mode_scale": Range(0.0, 10.0),
    "precondition_outputs": count(0, 1),
    "max_sequence_length": count(1, 512),
    # loss and noise variants
    "huber_c": Range(0.0, 1.0, low_open=True),
    "min_timestep": count(0, 999),
    "max_timestep": count(1, 1000),
    "multires_noise_iterations": count(0, 100, note="0 is off"),
    "multires_noise_discount": Range(0.0, 1.0),
    "adaptive_noise_scale": Range(-1.0, 1.0, note="0 is off"),
    "ip_noise_gamma": Range(0.0, 1.0, note="0 is off"),
    # data
    "num_class_images": count(0, HUGE, note="0: no class images are generated"),
    "sample_batch_size": count(1, 4096),
    "class_image_inference_steps": count(1, 1000),
    "resolution": PIXELS,
    "height": PIXELS,
    "width": PIXELS,
    "min_bucket_reso": PIXELS,
    "max_bucket_reso": PIXELS,
    "bucket_reso_steps": PIXELS,
    "caption_dropout_rate": share(note="0 is off"),
    "caption_tag_dropout_rate": share(note="0 is off"),
    "masked_loss_unmasked_weight": share(note="0 ignores the area outside the mask"),
    "keep_tokens": count(0, 1000, note="0: no tag is held in place but the instance prompt"),
    # batches, steps and schedule
    "per_device_train_batch_size": count(1, 65536),
    "train_batch_size": count(1, 65536),
    "per_device_eval_batch_size": count(1, 65536),
    "gradient_accumulation_steps": count(1, 65536),
    "eval_accumulation_steps": count(1, 65536),
    "num_train_epochs": positive(1e6),
    "max_steps": count(1, HUGE, special=(-1,), note="train --num_train_epochs epochs instead"),
    "max_train_steps": count(1, HUGE),
    "warmup_steps": count(0),
    "lr_warmup_steps": count(0),
    "warmup_ratio": share(),
    "num_cycles": positive(1e4),
    "lr_end": Range(0.0, 10.0),
    "power": positive(100.0),
    # optimizer
    "learning_rate": positive(10.0),
    "text_encoder_learning_rate": Range(0.0, 10.0, note="0 keeps the text encoder still"),
    "text_encoder_lr": Range(0.0, 10.0, note="0 keeps the text encoder still"),
    "weight_decay": Range(0.0, 10.0),
    "adam_weight_decay": Range(0.0, 10.0),
    "adam_beta1": Range(0.0, 1.0, high_open=True),
    "adam_beta2": Range(0.0, 1.0, high_open=True),
    "adam_epsilon": positive(1.0),
    "prodigy_d_coef": positive(100.0),
    "max_grad_norm": Range(0.0, 1e6, note="0 turns clipping off"),
    "scale_loss": positive(2.0**32),
    "ema_decay": Range(0.0, 1.0, low_open=True, high_open=True),
    "stop_text_encoder_training": count(0),
    # checkpoints, logging, validation, evaluation
    "logging_steps": count(1),
    "save_steps": count(1),
    "checkpointing_steps": count(1),
    "save_total_limit": count(1, note="unset keeps every checkpoint"),
    "checkpoints_total_limit": count(1, note="unset keeps every checkpoint"),
    "eval_steps": count(1),
    "max_evaluate_steps": count(1, HUGE, special=(-1,), note="-1: no limit"),
    "minimum_eval_times": count(1),
    "num_validation_images": count(1, 1000),
    "validation_epochs": count(1),
    "validation_steps": count(1),
    "validation_inference_steps": count(1, 1000),
    "evaluate_every_n_checkpoints": count(1),
    "eval_num_prompts": count(1, 1000),
    "eval_images_per_prompt": count(1, 100),
    # processes
    "seed": count(0, 2**32 - 1),
    "dataloader_num_workers": count(0, 256),
    "local_rank": count(0, 65535, special=(-1,), note="-1: set by the launcher"),
    "past_index": count(0, 1024, special=(-1,), note="-1: off"),
    "sharding_degree": count(1, 65536, special=(-1,), note="-1: all processes"),
    "sharding_parallel_degree": count(1, 65536, special=(-1,), note="-1: all processes"),
    "tensor_parallel_degree": count(1, 65536, special=(-1,), note="-1: off"),
    "pipeline_parallel_degree": count(1, 65536, special=(-1,), note="-1: off"),
    "sep_parallel_degree": count(1, 65536, special=(-1,), note="-1: off"),
}


def check_value(flag: str, value) -> None:
    """Refuse `value` for `--flag` when the table says it is out of range (unset values are left alone)."""
    valid = RANGES.get(flag)
    if value is None or valid is None or valid.accepts(value):
        return
    raise ConfigError(f"--{flag} {value!r} is out of range: it must be {valid.describe()}.")


def check_fields(arguments) -> None:
    """Check every numeric field of an argument dataclass against the table."""
    for field in dataclasses.fields(arguments):
        if field.init and field.name in RANGES:
            check_value(field.name, getattr(arguments, field.name))


def check_given(given: Dict[str, object], names: Optional[set] = None) -> None:
    """Check the given flags (all, or those in `names`) against the table."""
    for flag, value in given.items():
        if names is None or flag in names:
            check_value(flag, value)
