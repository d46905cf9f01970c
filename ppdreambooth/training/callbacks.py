"""Small training-time callbacks."""
from __future__ import annotations

from paddlenlp.trainer import TrainerCallback

from ppdreambooth.modeling.ema import WeightEMA
from ppdreambooth.runtime import phases


class StopTextEncoderCallback(TrainerCallback):
    """Freeze the text encoder from `--stop_text_encoder_training` steps on (also after a resume).

    The text encoder's learning-rate multiplier drops to 0 (AdamW then changes neither the weights nor,
    being decoupled and scaled by the rate, their decay). Gradients still flow, so data-parallel
    reducers see the same parameters every step.
    """

    def __init__(self, model, stop_step: int):
        self.model, self.stop_step, self.stopped = model, stop_step, False

    def _maybe_stop(self, step: int) -> None:
        if not self.stopped and step >= self.stop_step:
            for param in self.model.text_encoder_parameters():
                param.optimize_attr["learning_rate"] = 0.0
            self.stopped = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._maybe_stop(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_stop(state.global_step)


class PivotalFreezeCallback(TrainerCallback):
    """Freeze the new tokens of pivotal tuning after step int(--train_text_encoder_ti_frac x max_steps), also on a
    resume past that step (before its first step), and from then on encode each distinct prompt once.

    With one process the frozen tokens' prompts are then served from the model's memo (they get no gradient);
    under data parallel they are still encoded each step with a zero rate, because every rank's reducer expects a
    gradient for every trained parameter."""

    def __init__(self, model, world_size: int = 1):
        self.model, self.world_size = model, world_size
        self.freeze_step = None

    def _maybe_freeze(self, step: int) -> None:
        tokens = self.model.pivotal_tokens
        if tokens.frozen or step < self.freeze_step:
            return
        tokens.freeze()
        if self.world_size <= 1:
            self.model.memoize_prompts()

    def on_train_begin(self, args, state, control, **kwargs):
        self.freeze_step = self.model.pivotal_tokens.spec.freeze_step(state.max_steps)
        self._maybe_freeze(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_freeze(state.global_step)


class EMACallback(TrainerCallback):
    def __init__(self, ema: WeightEMA):
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update()


class PhaseCallback(TrainerCallback):
    """Phase markers (`runtime.phases`, on with PPDB_PHASE_LOG): the trainer's set-up, the first step (it also
    creates the optimizer's state), then every later step."""

    def __init__(self):
        self.first = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        held = trained = 0
        if model is not None:  # what the floor is computed from: every weight held, and the trained ones
            layers = [model, *getattr(model, "_frozen", {}).values()]
            held = sum(int(p.numel()) for layer in layers for p in layer.parameters())
            trained = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
        phases.mark("trainer set-up", step=state.global_step, held_parameters=held, trained_parameters=trained)
        self.first = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        phases.mark("first step" if state.global_step == self.first else "step", step=state.global_step)
