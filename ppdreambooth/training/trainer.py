"""`DreamBoothTrainer`: PaddleNLP's Trainer with DreamBooth's loss logging, sampling and saving.

What it changes, and why:
- `compute_loss` keeps the instance and prior parts so that `log` reports them separately.
- `create_optimizer` serves `--optim adafactor`, `prodigy`, `adamw_schedulefree` and `adamw_8bit` (PaddleNLP
  2.8.1 builds only AdamW) and clips gradients with `clipping.GlobalNormClip` (Paddle's global-norm clip, bit for
  bit, in about half its time); with schedule-free AdamW `create_scheduler` gives a constant rate and the
  optimizer applies the warmup itself.
- `log` adds the instance and prior losses, with pivotal tuning the mean norm of the new token vectors, with Prodigy its step-size estimate `prodigy_d`, with schedule-free
  AdamW its warmed-up rate `schedulefree_lr`.
- `_get_train_sampler` returns a sampler whose order and augmentations depend only on (seed, epoch).
- `_save` writes only trained weights into checkpoints (the stock one dumps the frozen VAE and text
  encoder too) and, for the final save, a full ppdiffusers pipeline folder. With schedule-free AdamW checkpoints
  hold the training point y (and the optimizer its z), the final model the average x (`optimizer.eval()`).
- `_save_checkpoint` unmarks a checkpoint folder before writing and marks it complete, with the checksums
  of its files, once all its files are written; rotation (`save_total_limit`) only ever counts and deletes
  complete checkpoints, unmarks each before deleting it, and never deletes the one just written.
- `training_step` hands the optimizer a device-side "non-finite loss" flag so that it skips such a step
  (`nonfinite.NonFiniteGuard`, no read of the loss per step); before anything is logged or saved, and at the end,
  the run stops with `NonFiniteLossError` naming the step; under data parallel all ranks skip and stop together.
- `_maybe_log_save_evaluate` stops after the step in progress when SIGTERM/SIGINT was received (every rank
  agreeing on the step): it writes a complete checkpoint at that step and raises `TrainingInterrupted`.
- On resume at an epoch boundary the stock loop never restores the RNG state (it does so only after
  skipping batches), and from a checkpoint at the last step it trains one step too many;
  `_inner_training_loop` restores the RNG state in the first case and skips training in the second.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Dict, Optional

import paddle
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_callback import TrainerState
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, OptimizerNames, TrainOutput

from ppdreambooth.runtime import phases, ranks, signals
from ppdreambooth.modeling.clipping import faster_clip
from ppdreambooth.data.dataset import SeededBatchSampler
from ppdreambooth.modeling.lora import LORA_STAGING_NAME, save_lora_weights
from ppdreambooth.runtime.streamed_save import save_checkpoint_object
from ppdreambooth.runtime.nonfinite import NonFiniteGuard, innermost_optimizer
from ppdreambooth.modeling.adamw8bit import AdamW8bit
from ppdreambooth.modeling.optimizers import Adafactor
from ppdreambooth.modeling.pivotal import save_embeddings
from ppdreambooth.modeling.prodigy import Prodigy
from ppdreambooth.modeling.schedulefree import AdamWScheduleFree
from ppdreambooth.runtime.checkpoints import (
    checkpoints_to_delete,
    complete_checkpoints,
    delete_checkpoint,
    is_complete,
    mark_complete,
    mark_incomplete,
    save_trainable_weights,
)
from ppdreambooth.errors import SaveError
from ppdreambooth.interop.pipeline_folder import STAGING_NAME, write_pipeline
from ppdreambooth.training.folders import describe_os_error
from ppdreambooth.training.resume_settings import write_settings

logger = logging.getLogger(__name__)
LOSS_PARTS = ("loss_instance", "loss_prior")


def prodigy_options(args) -> dict:
    """Prodigy's keyword arguments from the training arguments: Adam's betas and epsilon are the Trainer's
    --adam_* flags (the same defaults as prodigyopt's), the rest its --prodigy_* flags."""
    return {
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "d_coef": getattr(args, "prodigy_d_coef", 1.0),
        "safeguard_warmup": getattr(args, "prodigy_safeguard_warmup", False),
        "use_bias_correction": getattr(args, "prodigy_use_bias_correction", False),
    }


def schedule_free_options(args, warmup_steps: int) -> dict:
    """AdamWScheduleFree's keyword arguments: betas and epsilon are the Trainer's --adam_* flags, the warmup is
    the --lr_scheduler constant_with_warmup one (0 with constant)."""
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon, "warmup_steps": warmup_steps}


class DreamBoothTrainer(Trainer):
    def __init__(self, *args, base_model: str, base_revision: Optional[str] = None, base_vae: Optional[str] = None,
                 ema=None, stop=None, run_settings: Optional[dict] = None, schedule_free=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_settings = run_settings  # recorded in each checkpoint (`training.resume_settings`)
        # where the final pipeline takes the components the model does not hold (the VAE: --pretrained_vae_...)
        self.base_model, self.base_revision, self.base_vae = base_model, base_revision, base_vae
        self.ema = ema  # ppdreambooth.modeling.ema.WeightEMA or None
        # ppdreambooth.modeling.schedulefree.ScheduleFreeWeights (the seam validation and scoring use) or None:
        # create_optimizer attaches the optimizer to it
        self.schedule_free = schedule_free
        self._schedule_free_warmup = 0
        # ppdreambooth.runtime.signals.GracefulStop (default: the handlers of the run in progress, if any)
        self.stop = stop if stop is not None else signals.current()
        self._checkpoint_step = None  # the step of the checkpoint this process wrote last
        self._just_written = None  # that checkpoint's folder: rotation never deletes it
        self._loss_part_sums: Dict[str, paddle.Tensor] = {}
        self._loss_part_count = 0
        self.nonfinite = NonFiniteGuard(self.args.world_size)
        if self._save_ckpt_func is paddle.save:  # the optimizer file streamed: no second full copy of its state
            self._save_ckpt_func = save_checkpoint_object

    # ----- loss and logging ---------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False):
        outputs = model(**inputs)
        for name in LOSS_PARTS if self.model.with_prior_preservation else LOSS_PARTS[:1]:
            self._loss_part_sums[name] = self._loss_part_sums.get(name, 0.0) + outputs[name]
        self._loss_part_count += 1
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs and self._loss_part_count:
            for name, total in self._loss_part_sums.items():
                mean = self._nested_gather(total / self._loss_part_count).mean()
                logs[name] = round(float(mean), 6)
            self._loss_part_sums, self._loss_part_count = {}, 0
        optimizer = innermost_optimizer(self.optimizer) if self.optimizer is not None else None
        if "loss" in logs and isinstance(optimizer, Prodigy):
            logs["prodigy_d"] = optimizer.d  # its step size is d x the logged learning rate
        tokens = getattr(self.model, "pivotal_tokens", None)  # a DreamBoothModel's; None without pivotal tuning
        if "loss" in logs and tokens is not None:  # pivotal tuning: how far the new tokens have grown
            logs.update({f"ti_norm_{name}": round(norm, 6) for name, norm in tokens.norms().items()})
        if "loss" in logs and isinstance(optimizer, AdamWScheduleFree):
            logs["schedulefree_lr"] = optimizer.scheduled_lr  # the logged learning rate is the one after warmup
        super().log(logs, **kwargs)

    # ----- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, lr_scheduler=None):
        """The Trainer's optimizer set-up, with `--optim adafactor`, `prodigy`, `adamw_schedulefree` and
        `adamw_8bit` served by ppdreambooth's Adafactor, Prodigy, AdamWScheduleFree and AdamW8bit.

        PaddleNLP 2.8.1 builds only AdamW (`get_optimizer_cls_and_kwargs` raises for anything else). Its
        lookup is swapped for the duration of the stock set-up, so the optimizer gets exactly the arguments
        the Trainer gives AdamW (learning-rate schedule, weight decay and its exemptions, global-norm
        clipping, O2 master weights).
        """
        if self.optimizer is not None:
            return self.optimizer
        if self.args.optim == OptimizerNames.ADAFACTOR:
            ours = (Adafactor, {})
        elif self.args.optim == "prodigy":  # a plain string: PaddleNLP's OptimizerNames has no prodigy
            ours = (Prodigy, prodigy_options(self.args))
        elif self.args.optim == "adamw_schedulefree":
            ours = (AdamWScheduleFree, schedule_free_options(self.args, self._schedule_free_warmup))
        elif self.args.optim == "adamw_8bit":  # AdamW's own --adam_* settings
            ours = (AdamW8bit, {"beta1": self.args.adam_beta1, "beta2": self.args.adam_beta2,
                                "epsilon": self.args.adam_epsilon})
        else:
            return self._with_faster_clip(super().create_optimizer(lr_scheduler))
        stock = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
        Trainer.get_optimizer_cls_and_kwargs = staticmethod(lambda args: ours)
        try:
            optimizer = self._with_faster_clip(super().create_optimizer(lr_scheduler))
        finally:
            Trainer.get_optimizer_cls_and_kwargs = stock
        if self.schedule_free is not None:
            self.schedule_free.optimizer = innermost_optimizer(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int):
        """With --optim adamw_schedulefree a constant rate: the optimizer takes the warmup of --lr_scheduler
        constant_with_warmup itself (the reference's `warmup_steps`, whose first step already has lr / W), so that
        its averaging weights c follow the warmed-up rate."""
        if self.args.optim != "adamw_schedulefree" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps)
        from paddlenlp.trainer.trainer_utils import get_scheduler

        if str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)) == "constant_with_warmup":
            self._schedule_free_warmup = (self.args.warmup_steps if self.args.warmup_steps > 0
                                          else int(self.args.warmup_ratio * num_training_steps))
        self.lr_scheduler = get_scheduler("constant", learning_rate=self.args.learning_rate)
        return self.lr_scheduler

    def _schedule_free_optimizer(self) -> Optional[AdamWScheduleFree]:
        optimizer = innermost_optimizer(self.optimizer) if self.optimizer is not None else None
        return optimizer if isinstance(optimizer, AdamWScheduleFree) else None

    @staticmethod
    def _with_faster_clip(optimizer):
        """The stock `ClipGradByGlobalNorm(--max_grad_norm)` swapped for `clipping.GlobalNormClip`: the same
        clipped gradients in about half the time. Model-parallel/sharding wrappers built later
        replace the clip with their own as before."""
        optimizer._grad_clip = faster_clip(optimizer._grad_clip)
        return optimizer

    # ----- data ---------------------------------------------------------------------------------
    def _get_train_sampler(self):
        return SeededBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            num_replicas=max(self.args.dataset_world_size, 1),
            rank=max(self.args.dataset_rank, 0),
            seed=self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )

    # ----- resume ---------------------------------------------------------------------------------
    def _inner_training_loop(self, args, model, train_dataloader, len_dataloader, max_steps, num_train_epochs,
                             num_update_steps_per_epoch, *rest):
        resume_from_checkpoint = rest[1]
        if self.stop is not None:
            self.stop.enter(signals.TRAINING)  # from here a signal stops after the step in progress
        state_file = os.path.join(resume_from_checkpoint or "", "trainer_state.json")
        if resume_from_checkpoint and os.path.isfile(state_file):
            step = TrainerState.load_from_json(state_file).global_step
            if step >= max_steps:  # the stock loop would train one step more than asked
                logger.info("checkpoint %s is already at step %d of %d: nothing left to train",
                            resume_from_checkpoint, step, max_steps)
                self.is_in_train = False
                return TrainOutput(step, 0.0, {})
            if step % num_update_steps_per_epoch == 0:
                self._load_rng_state(resume_from_checkpoint)
        output = super()._inner_training_loop(
            args, model, train_dataloader, len_dataloader, max_steps, num_train_epochs,
            num_update_steps_per_epoch, *rest,
        )
        self.nonfinite.check(self.state.global_step)  # before the final model is written
        return output

    # ----- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None, merge_tensor_parallel=False):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        schedule_free = self._schedule_free_optimizer()
        if self.is_in_train:  # a checkpoint: trained weights for resume
            if schedule_free is not None and not schedule_free.training:
                raise RuntimeError("a checkpoint was to be written while the model held schedule-free AdamW's "
                                   "average x; checkpoints hold the training point y (optimizer.train())")
            save_trainable_weights(self.model, output_dir)
            paddle.save(self.args, os.path.join(output_dir, "training_args.bin"))
            if self.ema is not None:
                self.ema.save(output_dir)
            return
        if self.ema is not None:  # the output is the average
            self.ema.copy_to_model()
        if schedule_free is not None:  # the output is schedule-free's average x (the model keeps it from here on)
            schedule_free.eval()
        lora = self.model.lora
        try:
            if lora is not None:  # the final adapters
                save_lora_weights(output_dir, self.model.family, self.model.trained_layers())
            else:  # the final model
                write_pipeline(self.model, self.base_model, output_dir, revision=self.base_revision,
                               vae=self.base_vae)
            if self.model.pivotal_tokens is not None:  # the new tokens, as textual-inversion loaders read them
                save_embeddings(self.model.pivotal_tokens, self.model.family.textual_inversion_keys, output_dir)
        except OSError as e:
            for staging in (STAGING_NAME, LORA_STAGING_NAME):  # half-written files go; the space comes back
                shutil.rmtree(os.path.join(output_dir, staging), ignore_errors=True)
            raise self._write_failed(e, f"the final model in {output_dir}") from None

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        super()._load_from_checkpoint(resume_from_checkpoint)
        if self.ema is not None and resume_from_checkpoint:
            self.ema.load(resume_from_checkpoint)
        if resume_from_checkpoint:
            phases.mark("resume: weights")

    def _checkpoint_folder(self) -> str:
        return os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint(self, model, metrics=None):
        folder = self._checkpoint_folder()
        try:
            if self.args.should_save:
                mark_incomplete(folder)  # it may exist from an earlier attempt at this step
            super()._save_checkpoint(model, metrics=metrics)  # its collectives: every rank's files are written after
            if self.args.should_save:
                if self.run_settings is not None:
                    write_settings(folder, self.run_settings)  # before the marker: checksummed with the rest
                mark_complete(folder, self.state.global_step)
            phases.mark("checkpoint save", step=self.state.global_step)
        except OSError as e:
            if self.args.should_save:
                delete_checkpoint(folder)  # never complete; deleting it gives back the space it took
            raise self._write_failed(e, os.path.basename(folder)) from None
        self._checkpoint_step = self.state.global_step
        if self.args.should_save:
            self._just_written = folder
            self._rotate_checkpoints(output_dir=self.args.output_dir)

    def _write_failed(self, error: OSError, what: str) -> SaveError:
        """The error that ends a run whose checkpoint or final model could not be written: the reason, what is
        intact, and how to continue once the disk or folder is fixed."""
        intact = complete_checkpoints(self.args.output_dir)
        kept = (f"{os.path.basename(intact[-1])} is intact: free some space (or fix the folder) and continue with "
                "--resume_from_checkpoint latest" if intact else
                "no earlier checkpoint exists: free some space (or fix the folder) and start again")
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return SaveError(f"{describe_os_error(error)} while writing {what}{where}; {kept}.")

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        """Keep the newest `save_total_limit` complete checkpoints, the one just written always among them;
        never touch incomplete ones."""
        if not self.args.should_save:
            return
        for old in checkpoints_to_delete(output_dir or self.args.output_dir, self.args.save_total_limit,
                                         keep=self._just_written):
            delete_checkpoint(old)

    # ----- SIGTERM / SIGINT -------------------------------------------------------------------------
    def _agreed_stop_signal(self) -> int:
        """The signal to stop on after this step (0: none); under data parallel every rank gets the same answer."""
        local = self.stop.signum if self.stop is not None and self.stop.signum else 0
        return ranks.agree_max(local) if self.args.world_size > 1 else local

    def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
        signum = self._agreed_stop_signal()
        control = self.control
        if signum or control.should_log or control.should_save or control.should_evaluate:
            self.nonfinite.check(self.state.global_step)  # nothing logged or saved after a non-finite loss
        super()._maybe_log_save_evaluate(tr_loss, model, epoch, ignore_keys_for_eval, **kwargs)
        if signum:
            if self._checkpoint_step != self.state.global_step:
                # A checkpoint at the step just finished, to resume from; not a checkpoint event: the on_save
                # callbacks (image generation, scoring) would only delay the stop.
                self._save_checkpoint(model, metrics=None)
            folder = self._checkpoint_folder()
            if self.args.should_save and not is_complete(folder):
                raise RuntimeError(f"the checkpoint for the stop at step {self.state.global_step} is incomplete")
            raise signals.TrainingInterrupted(signum, self.state.global_step, self.state.max_steps, folder)

    # ----- bad numbers ------------------------------------------------------------------------------
    def training_step(self, model, inputs):
        step = ranks.progress["step"] = self.state.global_step + 1
        loss = super().training_step(model, inputs)
        skip = self.nonfinite.observe(loss, step)  # on the device: no host read here
        if not self.do_grad_scaling:  # fp16: the GradScaler's overflow check skips the step (its grads are non-finite)
            innermost_optimizer(self.optimizer)._set_auxiliary_var("found_inf", skip)
        return loss
