"""Schedule-free AdamW for Paddle dygraph (`--optim adamw_schedulefree`).

Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled", arXiv 2405.15682) replaces the decaying
learning-rate schedule by an average of the iterates: the rate stays constant after a warmup, and the weights to
use are a running average x of the Adam-style sequence z. Neither Paddle 3.3.1, PaddleNLP 2.8.1 nor ppdiffusers
0.29 has it, so it is written here by hand, following the update of the published reference implementation
(facebookresearch/schedule_free, class `AdamWScheduleFree`, with `r = 0`, `weight_lr_power = 2` and no inner
momentum), on the same base class as `optimizers.Adafactor` and `prodigy.Prodigy`.

Three sequences per weight:
- y: where the gradients are taken; it is what the model's parameters hold during training;
- z: the base sequence, an AdamW step at a constant rate from the gradient at y (kept in the optimizer state);
- x: the weighted average of z, the weights to evaluate and to save. It is not stored: it follows from y and z.

One optimizer step k (0, 1, ...) with the rate `base = get_lr()` (constant) and `warmup_steps` W, for every
parameter p (= y) with gradient g and rate multiplier m = p.optimize_attr["learning_rate"] (1 unless set):

    lr_k   = base * min(1, (k + 1) / W)                   (W = 0: no warmup)
    lr_max = max(lr_max, lr_k)                             (the largest rate so far; -1 before the first step)
    w_k    = lr_max ** 2                                   (weight_lr_power 2; r = 0: no polynomial factor)
    c      = w_k / sum_{i <= k} w_i                        (0 while the sum is 0, e.g. base = 0)
    v      = beta2 * v + (1 - beta2) * g ** 2              (z starts as y, v as 0, on p's first gradient)
    u      = g / (sqrt(v / (1 - beta2 ** (k + 1))) + eps) + weight_decay * y      (decoupled decay, taken at y)
    z'     = z - lr_k * m * u
    x'     = (1 - c) * x + c * z'
    y'     = (1 - beta1) * z' + beta1 * x'

With a constant rate c = 1 / (k + 1): x is the plain average of the z's; during the warmup the early, small-rate
iterates count less (c_{k+1} = lr_k^2 / sum lr_i^2, since lr_max = lr_k while the rate does not decrease).
x is never held: substituting x = (y - (1 - beta1) z) / beta1 gives the update as the reference applies it to
y directly,

    y' = y + c * (z - y) + lr_k * m * (beta1 * (1 - c) - 1) * u,      z' = z - lr_k * m * u

and `eval()` puts x = y + (1 - 1 / beta1) * (z - y) into the parameters (computed from the float32 y: the master
copy under multi_precision), `train()` puts y back. The reference's `train()` recomputes y from x
(y = x + (1 - beta1) * (z - x), exact only up to rounding); here `eval()` keeps the parameters' y and `train()`
restores exactly those bits, so evaluating never changes training. `step()` refuses to run in eval mode. The
optimizer starts in train mode (before its first step x = y = z for every parameter).

Per-parameter rate multipliers (`--text_encoder_learning_rate` is one, `DreamBoothModel.set_text_encoder_
learning_rate`): m scales that parameter's step, i.e. its rate in z, in y and in the decay. The averaging weight c
is one number for the whole model, computed from the schedule's rate lr_k alone: for a constant m it is exactly
what the reference computes for a parameter group with rate m * lr_k (the m ** 2 cancels in the ratio), so every
parameter is averaged the same way whatever its multiplier. m = 0 freezes the parameter completely: no state
change at all (y, z, v stay, so its x stays), as `--stop_text_encoder_training` needs. (The reference's lr = 0
group still updates v and pulls y towards z.)

Schedules: the rate must be constant after the warmup, which the optimizer applies itself (the reference's
`warmup_steps`, linear from base / W at step 0); ppdreambooth hands it a constant `get_lr()` and refuses
decaying `--lr_scheduler` values. The state is float32 whatever the parameter dtype: bf16/fp16 weights are
updated from a float32 computation and rounded back, or, with `multi_precision=True` (PaddleNLP passes it under
O2), through a float32 master copy of y. Gradient clipping (`grad_clip`) runs once over all gradients before
the update; a step is skipped, k included, when the grad scaler's `found_inf` flag is set.

`state_dict()` keys z and v by parameter name (`<param.name>_schedulefree_z`, `..._exp_avg_sq`) and stores
k, sum w_i and lr_max as `schedulefree_k` (int64), `schedulefree_weight_sum` and `schedulefree_lr_max` (float64);
with the model's y (what the parameters hold in train mode) that is the whole training state, so a resumed run
continues bit for bit. Checkpoints must be taken in train mode; the final model is saved after `eval()`.

State: z and v, two float32 tensors per weight, as AdamW's two moments (no first moment: beta1 is the
interpolation weight, not a momentum). Limits: dygraph only; no sharding (the sharding wrappers drive
`_apply_optimize`, which this class does not implement); PaddleNLP's unified checkpoints are untested.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Optional, Tuple

import paddle

from ppdreambooth.modeling.optimizers import HandWrittenOptimizer, _float32, _fp32_copy

logger = logging.getLogger(__name__)

_SUFFIX = "_schedulefree_"
_SCALAR_PREFIX = "schedulefree_"
_SCALARS = ("k", "weight_sum", "lr_max")
_KINDS = ("z", "exp_avg_sq")


class AdamWScheduleFree(HandWrittenOptimizer):
    """Schedule-free AdamW (see the module docstring for the update rule and eval()/train())."""

    def __init__(
        self,
        learning_rate=0.0025,
        parameters=None,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: Optional[float] = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        grad_clip=None,
        apply_decay_param_fun: Optional[Callable[[str], bool]] = None,
        multi_precision: bool = False,
        name: Optional[str] = None,
    ):
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if isinstance(learning_rate, float) and learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError("AdamWScheduleFree takes its weight decay as a number, not a regularizer")
        beta1, beta2 = (float(b) for b in betas)
        if not 0.0 < beta1 < 1.0:  # x = (y - (1 - beta1) z) / beta1: beta1 = 0 would lose x
            raise ValueError(f"betas[0] must be in (0, 1) for schedule-free AdamW, got {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"betas[1] must be in [0, 1), got {beta2}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
        # Weight decay is not handed to the base class: it would become an L2 term on the gradient.
        super().__init__(learning_rate=learning_rate, parameters=parameters, weight_decay=None,
                         grad_clip=grad_clip, name=name)
        self._weight_decay = float(weight_decay or 0.0)
        self._apply_decay_param_fun = apply_decay_param_fun
        self._beta1, self._beta2 = beta1, beta2
        self._eps = float(eps)
        self._warmup_steps = int(warmup_steps)
        self._r = float(r)
        self._weight_lr_power = float(weight_lr_power)
        self._multi_precision = bool(multi_precision)
        # The optimizer-wide numbers (saved), as the reference starts them ...
        self._k, self._weight_sum, self._lr_max = 0, 0.0, -1.0
        # ... and the last step's rate and c (for logging, not saved).
        self.scheduled_lr, self.last_c = 0.0, None
        # Per parameter name: {"z", "exp_avg_sq"} (float32).
        self._state: Dict[str, dict] = {}
        self._train_mode = True
        self._stashed_y: Dict[str, paddle.Tensor] = {}  # the parameters' y while in eval mode

    @property
    def training(self) -> bool:
        """True in train mode (the parameters hold y), False after eval() (they hold x)."""
        return self._train_mode

    # ----------------------------------------------------------------------------------------------
    # The update

    def _scheduled_rate(self, k: int) -> float:
        base = float(self.get_lr())
        if k < self._warmup_steps:
            return base * (k + 1) / self._warmup_steps
        return base

    @paddle.no_grad()
    def step(self):
        if not self._train_mode:
            raise RuntimeError("AdamWScheduleFree.step() in eval mode: call optimizer.train() first (the "
                               "parameters hold the average x, not the training point y)")
        gathered = self._step_gradients()
        if gathered is None:
            return  # the grad scaler found an overflow: no step, k unchanged
        params_grads, decays = gathered
        if params_grads and self._grad_clip is not None:  # one call: a global norm is over all parameters
            params_grads = self._grad_clip(params_grads)

        k = self._k
        lr = self._scheduled_rate(k)
        lr_max = self._lr_max = max(lr, self._lr_max)
        weight = ((k + 1) ** self._r) * (lr_max ** self._weight_lr_power)
        self._weight_sum = weight_sum = self._weight_sum + weight
        c = weight / weight_sum if weight_sum != 0 else 0.0
        bias_correction2 = 1.0 - self._beta2 ** (k + 1)
        beta1, beta2 = self._beta1, self._beta2

        for param, grad in params_grads:
            attr = getattr(param, "optimize_attr", None) or {}
            multiplier = float(attr.get("learning_rate", 1.0))
            if not multiplier > 0:
                continue  # frozen: y, z and v stay as they are
            decay = decays[id(param)]
            if decay and self._apply_decay_param_fun is not None and not self._apply_decay_param_fun(param.name):
                decay = 0.0
            y = self._weight(param)
            state = self._state.get(param.name)
            if state is None:
                state = self._state[param.name] = {"z": y.clone(), "exp_avg_sq": paddle.zeros_like(y)}
            g = _float32(grad)
            state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * (g * g)
            update = g / (paddle.sqrt(state["exp_avg_sq"] / bias_correction2) + self._eps)
            del g
            if decay:
                update = update + decay * y
            rate = lr * multiplier
            z = state["z"]
            y = (y + c * (z - y)) + (rate * (beta1 * (1.0 - c) - 1.0)) * update
            state["z"] = z - rate * update
            del update, z
            if param.name in self._master_weights:
                self._master_weights[param.name] = y
            paddle.assign(y.astype(param.dtype), output=param)
        self._k = k + 1
        self.scheduled_lr, self.last_c = lr, c

    # ----------------------------------------------------------------------------------------------
    # Evaluation weights

    @paddle.no_grad()
    def eval(self) -> None:
        """Put x, the average, into the parameters (their y is kept for train()). Nothing happens in eval mode."""
        if not self._train_mode:
            return
        factor = 1.0 - 1.0 / self._beta1
        for param, _ in self._params_with_decay():
            state = self._state.get(param.name)
            if state is None:
                continue  # never stepped: x = y
            self._stashed_y[param.name] = param.detach().clone()
            y = self._weight(param)
            x = y + factor * (state["z"] - y)
            paddle.assign(x.astype(param.dtype), output=param)
        self._train_mode = False

    @paddle.no_grad()
    def train(self) -> None:
        """Put y back into the parameters, bit for bit as eval() found it. Nothing happens in train mode."""
        if self._train_mode:
            return
        for param, _ in self._params_with_decay():
            stashed = self._stashed_y.pop(param.name, None)
            if stashed is not None:
                paddle.assign(stashed, output=param)
        self._stashed_y = {}
        self._train_mode = True

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The parameters hold x inside the block, y again afterwards (if they held y before)."""
        was_training = self._train_mode
        self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """z and v keyed `<param.name>_schedulefree_<kind>`, k, sum w and lr_max as `schedulefree_<name>`, master
        weights (y) and the scheduler. Taken in eval mode it is the same (the state never holds x)."""
        result = {}
        for pname, state in self._state.items():
            for kind in _KINDS:
                result[pname + _SUFFIX + kind] = state[kind]
        result[_SCALAR_PREFIX + "k"] = paddle.to_tensor(self._k, dtype="int64")
        result[_SCALAR_PREFIX + "weight_sum"] = paddle.to_tensor(self._weight_sum, dtype="float64")
        result[_SCALAR_PREFIX + "lr_max"] = paddle.to_tensor(self._lr_max, dtype="float64")
        return self._shared_state(result)

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned (tensors are copied), for the parameters this optimizer holds; in
        train mode, with the model's y loaded alongside (as PaddleNLP's Trainer resumes)."""
        if not self._train_mode:
            raise RuntimeError("AdamWScheduleFree.set_state_dict() in eval mode: call optimizer.train() first")
        ours = [key for key in state_dict if _SUFFIX in key]
        scalars = self._checked_scalars(state_dict, _SUFFIX, _SCALAR_PREFIX, _SCALARS, "a schedule-free AdamW")
        self._load_shared_state(state_dict)

        loaded = set()
        for param, _ in self._params_with_decay():
            keys = {kind: param.name + _SUFFIX + kind for kind in _KINDS}
            present = [kind for kind, key in keys.items() if key in state_dict]
            if not present:
                continue  # no state saved for it (no gradient or a multiplier of 0 so far): it starts fresh
            if len(present) != len(_KINDS):
                absent = [key for kind, key in keys.items() if kind not in present]
                raise ValueError(f"optimizer state {absent[0]} missing from the state dict")
            state = {}
            for kind, key in keys.items():
                state[kind] = _fp32_copy(state_dict[key])
                if list(state[kind].shape) != list(param.shape):
                    raise ValueError(f"optimizer state {key} has shape {list(state[kind].shape)}, expected "
                                     f"{list(param.shape)}")
            self._state[param.name] = state
            loaded.update(keys.values())
        self._k = int(scalars["k"])
        self._weight_sum, self._lr_max = float(scalars["weight_sum"]), float(scalars["lr_max"])
        unused = sorted(set(ours) - loaded)
        if unused:
            logger.warning("AdamWScheduleFree: %d saved state tensors match no parameter, e.g. %s", len(unused),
                           unused[:3])

    load_state_dict = set_state_dict


class ScheduleFreeWeights:
    """The seam through which validation images, fidelity scoring (`training.sampling_context.sampling_from`)
    and the final save see schedule-free's x: like `ema.WeightEMA.swapped_in()`, a block in which the model
    holds the evaluation weights. The optimizer is attached once the Trainer has built it; before that (no
    step yet) x equals the model's weights and the block changes nothing."""

    def __init__(self, optimizer: Optional[AdamWScheduleFree] = None):
        self.optimizer = optimizer

    @contextlib.contextmanager
    def swapped_in(self):
        if self.optimizer is None:
            yield
            return
        with self.optimizer.evaluation_weights():
            yield

