"""Validation images during training: `--validation_prompt` every `--validation_steps` steps and/or
every `--validation_epochs` epochs, and once more when training ends (unless `--not_validation_final`).

Images come from the weights being trained (LoRA adapters active), DPM-Solver with
`--validation_inference_steps` steps and fixed seeds (seed + i), so runs and steps compare. They are
written to `output_dir/validation/step-N/` and logged to VisualDL, on the first process only.
With `--use_ema` the images come from the EMA weights, with `--optim adamw_schedulefree` from the optimizer's
average x (`ema` is then a `schedulefree.ScheduleFreeWeights`). Validation does not change training: the
model's weights, its train/eval mode and every RNG state are restored.
"""
from __future__ import annotations

import logging
import os
from typing import List

import numpy as np
from paddlenlp.trainer import TrainerCallback

from ppdreambooth.inference.sampling import generate_images
from ppdreambooth.training.sampling_context import sampling_from

logger = logging.getLogger(__name__)


class ValidationCallback(TrainerCallback):
    def __init__(self, model, ema=None):
        self.model, self.ema = model, ema
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
        with sampling_from(self.model, self.ema) as pipeline:
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
