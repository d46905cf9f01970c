"""What the console shows during training, and the log file in the output folder that keeps everything.

The stack below ppdreambooth talks a lot: PaddleNLP's Trainer dumps its argument table and every
component load, ppdiffusers adds progress bars and deprecation notes about configs the user cannot change.
By default the console shows a short header, the training progress bar, one line per logging step with
the loss, one line per checkpoint, warnings, and the closing summary; every message of every library goes
to `<output_dir>/train.log`. `--log_level debug` (or info) brings the full detail back to the console.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

from paddlenlp.trainer import TrainerCallback

LOG_FILE = "train.log"
LIBRARY_LOGGERS = ("PaddleNLP", "ppdiffusers", "paddle", "py.warnings")
_current_file: list = []  # the log-file handler of this process's current run (one run after another: tests)


def quiet_console(output_dir: str, log_level: str = "passive", rank: int = 0) -> str:
    """Send every library's messages to `<output_dir>/train.log` (rank r > 0: `train-rank<r>.log`), and only
    their warnings to the console (unless `log_level` is debug or info); ppdreambooth's own messages stay on
    the console. Returns the log path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOG_FILE if rank == 0 else f"train-rank{rank}.log")
    for old in _current_file:  # an earlier run of this process: its file gets no more lines
        for name in LIBRARY_LOGGERS + ("ppdreambooth",):
            logging.getLogger(name).removeHandler(old)
        old.close()
    _current_file.clear()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.setLevel(logging.DEBUG)
    _current_file.append(to_file)
    verbose = log_level in ("debug", "info")
    logging.captureWarnings(True)  # deprecation notes about configs: to the file (and the console if verbose)
    warnings.simplefilter("default")
    for name in LIBRARY_LOGGERS + ("ppdreambooth",):
        logger = logging.getLogger(name)
        logger.addHandler(to_file)
        if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
            logger.setLevel(logging.DEBUG if name != "ppdreambooth" else logging.INFO)
        if name in LIBRARY_LOGGERS:
            screens = [h for h in logger.handlers if h is not to_file and not isinstance(h, logging.FileHandler)]
            if not screens:  # its own console handler, so that it need not propagate to the root logger
                screens = [logging.StreamHandler()]
                logger.addHandler(screens[0])
                logger.propagate = False
            for handler in screens:
                handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        from ppdiffusers.utils import logging as ppdiffusers_logging

        ppdiffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
    own = logging.getLogger("ppdreambooth")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in own.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("ppdreambooth: %(message)s"))
        console.setLevel(logging.INFO)
        own.addHandler(console)
        own.propagate = False
    return path


LYCORIS_NAMES = {"loha": "LoHa", "lokr": "LoKr"}


def adapter_mode(model_args) -> str:
    """What the run trains, in words (the header's first line)."""
    if not model_args.use_lora:
        return "full fine-tuning"
    lora_type = getattr(model_args, "lora_type", "lora")
    conv = (f"; 3x3 convolutions rank {model_args.conv_rank}, alpha {model_args.conv_alpha:g}"
            if getattr(model_args, "conv_rank", None) else "")
    if lora_type == "dora":
        return f"DoRA rank {model_args.lora_rank} (LoRA + a magnitude per output feature)"
    if lora_type == "loha":
        return f"LoHa rank {model_args.lora_rank}, alpha {model_args.lora_alpha:g}{conv} (LyCORIS)"
    if lora_type == "lokr":
        return f"LoKr rank {model_args.lora_rank}, factor {model_args.lokr_factor}{conv} (LyCORIS)"
    if conv:
        return f"LoRA rank {model_args.lora_rank}; LoCon{conv[1:]}"
    return f"LoRA rank {model_args.lora_rank}"


def header(family, model_args, data_args, args, dataset, log_path: str,
           adapter_parameters: Optional[int] = None, adapter_targets: str = "") -> str:
    """The few lines a user wants before the first step (`adapter_parameters`: the trained adapters' size;
    `adapter_targets`: where they are, per component, `modeling.lora_targets.adapter_summary`)."""
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if args.fp16 or args.bf16:
        precision += f" {args.fp16_opt_level}"
    mode = adapter_mode(model_args)
    photos = sum(len(c.instance.images) for c in dataset.concepts)
    classes = sum(len(c.prior.images) for c in dataset.concepts if c.prior is not None)
    steps = args.max_steps if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    caption_line = []
    if dataset.captions is not None:  # kohya's caption options
        varying = ("; prompts encoded at each step (the text encoders stay on the device)"
                   if dataset.captions_vary else "")
        caption_line = [f"  captions:  {dataset.captions.describe()} (instance photos only){varying}"]
    if data_args.masked_loss:
        source = "the photos' alpha channel" if data_args.alpha_mask else "mask files"
        unmasked = data_args.masked_loss_unmasked_weight
        caption_line.append(f"  masks:     loss weighted by {source} on the {dataset.mask_factor}x{dataset.mask_factor}"
                            f"-pixel latent grid; outside weight {unmasked:g}"
                            + (", normalised by mask area" if data_args.masked_loss_normalize else "")
                            + "; class rows unmasked")
    return "\n".join([
        f"ppdreambooth: {mode} of {model_args.pretrained_model_name_or_path} ({family.name}, {family.pipeline_class})",
        f"  data:      {photos} instance photo(s) in {len(dataset.concepts)} concept(s)"
        + (f", {classes} class image(s)" if classes else "") + f", {len(dataset)} examples per epoch",
        *caption_line,
        *pivotal_line(model_args, args),
        *([f"  adapters:  {adapter_parameters:,} trained parameters"
           + (f" ({adapter_targets})" if adapter_targets else "")] if adapter_parameters is not None else []),
        f"  training:  {steps} steps, batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
        f"accumulation x {max(args.world_size, 1)} process(es), learning rate {args.learning_rate:g}, {precision}",
        f"  output:    {args.output_dir} (full log: {log_path})",
    ])


def pivotal_line(model_args, args) -> list:
    if not getattr(model_args, "train_text_encoder_ti", False):
        return []
    from ppdreambooth.modeling.pivotal import spec_from_arguments

    spec = spec_from_arguments(model_args)
    until = (f"until step {spec.freeze_step(args.max_steps)}" if args.max_steps > 0
             else f"for {spec.train_fraction:g} of the run")
    start = f" from {spec.initializer_concept!r}" if spec.initializer_concept else ""
    return [f"  pivotal:   {spec.token_abstraction!r} -> {spec.replacement} in the instance prompts; the new tokens "
            f"train{start} {until}, then freeze"]


class ConsoleCallback(TrainerCallback):
    """One line per logging step (losses, learning rate) and per checkpoint, written above the progress bar."""

    def _write(self, state, line: str) -> None:
        if state.is_local_process_zero:
            from tqdm.auto import tqdm

            tqdm.write(line)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            parts += [f"{k.split('_', 1)[1]} {logs[k]:.4f}" for k in ("loss_instance", "loss_prior") if k in logs]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.3g}")
            norms = [f"{logs[k]:.4f}" for k in sorted(logs) if k.startswith("ti_norm_")]
            if norms:  # pivotal tuning: the new tokens' mean norm, per CLIP encoder
                parts.append("token norm " + "/".join(norms))
            self._write(state, f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts))

    def on_save(self, args, state, control, **kwargs):
        self._write(state, f"checkpoint-{state.global_step} written to {args.output_dir}")
