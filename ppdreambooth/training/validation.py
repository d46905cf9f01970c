"""Validation images during training: `--validation_prompt` every `--validation_steps` steps and/or
every `--validation_epochs` epochs, and once more when training ends (unless `--not_validation_final`).

Images come from the weights being trained (LoRA adapters active), DPM-Solver with
`--validation_inference_steps` steps and fixed seeds (seed + i), so runs and steps compare. They are
written to `output_dir/validation/step-N/` and logged to VisualDL, on the first process only.
With `--use_ema` the images come from the EMA weights. Validation does not change training: the
model's weights, its train/eval mode and every RNG state are restored.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import List

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback

from ppdreambooth.inference.sampling import generate_images

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def preserved_rng_state():
    states = (paddle.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        paddle.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


@contextlib.contextmanager
def sampling_from(model, base_model: str, revision=None, ema=None):
    """The pipeline over the weights being trained (the EMA average with --use_ema), in eval mode; afterwards
    training is as it was: train/eval mode, parked encoders, weights and every RNG state restored."""
    was_training = model.denoiser.training
    averaged = ema.swapped_in() if ema is not None else contextlib.nullcontext()
    with preserved_rng_state(), model.parked_on_device(), averaged:
        model.eval()
        try:
            yield validation_pipeline(model, base_model, revision)
        finally:
            if was_training:
                model.train()


def validation_pipeline(model, base_model: str, revision=None):
    """The family's pipeline over the model's current denoiser, text encoders and VAE, with the family's
    deterministic sampler (DPM-Solver; SD3: flow-matching Euler)."""
    import ppdiffusers

    family = model.family
    scheduler_class = getattr(ppdiffusers, family.sampling_scheduler)
    scheduler = scheduler_class.from_pretrained(base_model, subfolder="scheduler", revision=revision)
    names = (family.denoiser, "vae", *family.text_encoders, *family.tokenizers)
    components = {name: getattr(model, name) if model.has_component(name) else None for name in names}
    pipeline = family.build_pipeline(components, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class ValidationCallback(TrainerCallback):
    def __init__(self, model, base_model: str, revision=None, ema=None):
        self.model, self.base_model, self.revision, self.ema = model, base_model, revision, ema
        self._done_steps = set()
        self._writer = None

    def _due(self, args, state, epoch_end: bool) -> bool:
        if epoch_end:
            epoch = round(state.epoch)
            return bool(args.validation_epochs) and epoch > 0 and epoch % args.validation_epochs == 0
        return bool(args.validation_steps) and state.global_step % args.validation_steps == 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._due(args, state, epoch_end=False):
            self.validate(args, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._due(args, state, epoch_end=True):
            self.validate(args, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not args.not_validation_final:
            self.validate(args, state.global_step)
        if self._writer is not None:
            self._writer.close()

    def validate(self, args, step: int) -> List[str]:
        if not args.should_save or step in self._done_steps:
            return []
        self._done_steps.add(step)
        folder = os.path.join(args.output_dir, "validation", f"step-{step}")
        os.makedirs(folder, exist_ok=True)
        with sampling_from(self.model, self.base_model, self.revision, self.ema) as pipeline:
            seeds = [args.seed + i for i in range(args.num_validation_images)]
            images = generate_images(pipeline, [args.validation_prompt] * len(seeds), seeds,
                                     num_inference_steps=args.validation_inference_steps)
        paths = []
        for i, image in enumerate(images):
            paths.append(os.path.join(folder, f"image-{i}.png"))
            image.save(paths[-1])
        self._log_images(args, step, images)
        logger.info("validation images for step %d written to %s", step, folder)
        return paths

    def _log_images(self, args, step, images) -> None:
        if "visualdl" not in args.report_to:
            return
        if self._writer is None:
            from visualdl import LogWriter

            self._writer = LogWriter(logdir=args.logging_dir, file_name="vdlrecords.validation.log")
        for i, image in enumerate(images):
            self._writer.add_image(tag=f"validation/{i}", img=np.asarray(image), step=step)
