"""Adafactor for Paddle dygraph, written by hand because nothing in the pinned stack provides it.

PaddleNLP 2.8.1's `TrainingArguments` accepts `--optim adafactor`, but its Trainer only builds AdamW, and
neither Paddle 3.3.1, PaddleNLP nor ppdiffusers ships an Adafactor. Full SDXL fine-tuning (a 2.6B-parameter
UNet) needs Adafactor's factored second moments to fit in 24 GB: AdamW keeps two full float32 moments per
weight, Adafactor keeps one row and one column vector per matrix (and, by default, no first moment).

This is Adafactor (Shazeer & Stern, 2018) with an external learning rate, i.e. the same rule as the
`transformers` Adafactor with `scale_parameter=False, relative_step=False, warmup_init=False` (kohya's SDXL
recipe). For each parameter p with gradient g, its own step count t (1, 2, ...) and rate
lr = get_lr() * p.optimize_attr["learning_rate"]:

    beta2_t = 1 - t ** decay_rate                      (decay_rate = -0.8; beta2_1 = 0)
    s       = g * g + eps[0]
    if p has >= 2 dims (factored over its last two dims; R, C are float32):
        R = beta2_t * R + (1 - beta2_t) * mean(s, axis=-1)     # one number per row
        C = beta2_t * C + (1 - beta2_t) * mean(s, axis=-2)     # one number per column
        u = g / sqrt(outer(R / mean(R, axis=-1), C))
    else:
        V = beta2_t * V + (1 - beta2_t) * s
        u = g / sqrt(V)
    u = u / max(1, rms(u) / clip_threshold)            # update clipping, rms(x) = sqrt(mean(x ** 2))
    u = lr * u
    if beta1 is not None:                              # optional first moment, of the lr-scaled update
        M = beta1 * M + (1 - beta1) * u
        u = M
    p = p - lr * weight_decay * p - u                  # decoupled decay, only where apply_decay_param_fun says so

`eps[1]` only matters with scale_parameter, which is not implemented; it is kept for a familiar signature.
The state is float32 whatever the parameter dtype: bf16/fp16 weights are updated from a float32
computation and rounded back, or, with `multi_precision=True` (PaddleNLP passes it under `--fp16_opt_level
O2`), through a float32 master copy. Gradient clipping (`grad_clip`, e.g. `paddle.nn.ClipGradByGlobalNorm`)
runs once over the gradients of all parameters before the update.

`state_dict()` keys every tensor by parameter name (`<param.name>_adafactor_<kind>`, as Paddle's own
optimizers do), so PaddleNLP's Trainer can `paddle.save` it as `optimizer.pdopt` and `set_state_dict` it on
resume, before or after the first step.

Limits: dygraph only (call `step()`; static-graph `minimize` is not implemented). Only the plain
`optimizer.pdopt` checkpoint path is supported: PaddleNLP's unified checkpoints and sharding-stage-1
resharding expect AdamW-style accumulators and are untested with this class.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import paddle
from paddle.optimizer.lr import LRScheduler

logger = logging.getLogger(__name__)

_LOW_PRECISION = (paddle.float16, paddle.bfloat16)
_SUFFIX = "_adafactor_"


class HandWrittenOptimizer(paddle.optimizer.Optimizer):
    """What the hand-written optimizers (Adafactor here, `prodigy.Prodigy`) share: walking the parameters with
    their weight decay, and gathering this step's gradients (`main_grad` under O2, else `grad`)."""

    def _params_with_decay(self):
        """(parameter, weight decay) for every parameter, across parameter groups if any."""
        if self._param_groups and isinstance(self._param_groups[0], dict):
            for group in self._param_groups:
                # The base class fills a missing group weight decay with None: use the optimizer's.
                decay = group.get("weight_decay")
                decay = self._weight_decay if not isinstance(decay, (int, float)) else float(decay)
                for param in group["params"]:
                    yield param, decay
        else:
            for param in self._param_groups or []:
                yield param, self._weight_decay

    def _step_gradients(self):
        """None when the grad scaler (fp16) found an overflow (it hands its flag over this way and calls step()
        regardless: the step is skipped); else ([(param, grad)], {id(param): weight decay}) of the trainable
        parameters that have a gradient."""
        found_inf = self._get_auxiliary_var("found_inf")
        if found_inf is not None and bool(found_inf):
            return None
        params_grads, decays = [], {}
        for param, decay in self._params_with_decay():
            if param.stop_gradient:
                continue
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            params_grads.append((param, grad))
            decays[id(param)] = decay
        return params_grads, decays

    # The checkpoint plumbing all three share: per-parameter state keyed by parameter name (as Paddle's own
    # optimizers do, so PaddleNLP's Trainer saves it in optimizer.pdopt and loads it on resume), the float32
    # master weights and the learning-rate scheduler.

    def _weight(self, param):
        """The float32 weights to update: the master copy under multi_precision (made on first use), else the
        parameter in float32."""
        if self._multi_precision and param.dtype in _LOW_PRECISION and param.name not in self._master_weights:
            self._master_weights[param.name] = param.astype("float32")
        master = self._master_weights.get(param.name)
        return master if master is not None else _float32(param)

    def _per_parameter_state(self, suffix: str) -> dict:
        """Each parameter's state tensors keyed `<param.name><suffix><kind>` (a step count as an int64 tensor)."""
        result = {}
        for pname, state in self._state.items():
            for kind, value in state.items():
                if kind == "step":
                    value = paddle.to_tensor(value, dtype="int64")
                result[pname + suffix + kind] = value
        return result

    def _shared_state(self, result: dict) -> dict:
        """`result` plus the master weights and the scheduler's state."""
        if self._master_weights:
            result["master_weights"] = dict(self._master_weights)
        if isinstance(self._learning_rate, LRScheduler):
            result["LR_Scheduler"] = self._learning_rate.state_dict()
        return result

    def _load_shared_state(self, state_dict: dict) -> None:
        """The scheduler's state and copies of the master weights, from what `_shared_state` added."""
        if isinstance(self._learning_rate, LRScheduler) and state_dict.get("LR_Scheduler"):
            self._learning_rate.set_state_dict(state_dict["LR_Scheduler"])
        for pname, value in (state_dict.get("master_weights") or {}).items():
            self._master_weights[pname] = _fp32_copy(value)

    def _load_per_parameter_state(self, state_dict: dict, suffix: str, shapes_of) -> None:
        """For each parameter with a saved `<param.name><suffix>step`: its step and its state tensors (copied by
        `_restored`), each checked against `shapes_of(param)` ({kind: shape}); a parameter without one starts
        fresh (it never had a gradient). Saved tensors that match no parameter are named in a warning."""
        loaded = set()
        for param, _ in self._params_with_decay():
            step_key = param.name + suffix + "step"
            if step_key not in state_dict:
                continue
            state = {"step": int(_to_tensor(state_dict[step_key]).item())}
            for kind, shape in shapes_of(param).items():
                key = param.name + suffix + kind
                if key not in state_dict:
                    raise ValueError(f"optimizer state {key} missing from the state dict")
                state[kind] = self._restored(kind, state_dict[key])
                if list(state[kind].shape) != shape:
                    raise ValueError(f"optimizer state {key} has shape {list(state[kind].shape)}, expected {shape}")
            self._state[param.name] = state
            loaded.update(param.name + suffix + kind for kind in state)
        unused = sorted({key for key in state_dict if suffix in key} - loaded)
        if unused:
            logger.warning("%s: %d saved state tensors match no parameter, e.g. %s", type(self).__name__,
                           len(unused), unused[:3])

    def _restored(self, kind: str, value) -> paddle.Tensor:
        """A saved state tensor as this optimizer keeps it: a float32 copy."""
        return _fp32_copy(value)

    @staticmethod
    def _checked_scalars(state_dict: dict, suffix: str, prefix: str, scalars, what: str) -> dict:
        """The optimizer-wide numbers saved as `<prefix><name>`, after checking that every other key is
        per-parameter state (`<param.name><suffix><kind>`), the master weights or the scheduler's state; a
        ValueError names a foreign or a missing key."""
        scalar_keys = [prefix + kind for kind in scalars]
        others = [key for key in state_dict
                  if key not in ("LR_Scheduler", "master_weights") and suffix not in key and key not in scalar_keys]
        if others:
            raise ValueError(f"not {what} state dict (keys such as {others[:3]})")
        missing = [key for key in scalar_keys if key not in state_dict]
        if missing:
            raise ValueError(f"optimizer state {missing[0]} missing from the state dict")
        return {kind: _to_tensor(state_dict[prefix + kind]).item() for kind in scalars}


class Adafactor(HandWrittenOptimizer):
    """Adafactor with an external learning rate (see the module docstring for the update rule)."""

    def __init__(
        self,
        learning_rate,
        parameters,
        weight_decay: Optional[float] = 0.0,
        grad_clip=None,
        apply_decay_param_fun: Optional[Callable[[str], bool]] = None,
        beta1: Optional[float] = None,
        decay_rate: float = -0.8,
        eps: Tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        multi_precision: bool = False,
        name: Optional[str] = None,
    ):
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError("Adafactor applies decoupled weight decay: pass a number, not a regularizer")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be None or in [0, 1), got {beta1}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be positive, got {clip_threshold}")
        # The base class keeps the rate, the parameters (or groups) and grad_clip. Weight decay is not
        # handed to it: it would become an L2 term on the gradient, not the decoupled decay used here.
        super().__init__(learning_rate=learning_rate, parameters=parameters, weight_decay=None,
                         grad_clip=grad_clip, name=name)
        self._weight_decay = float(weight_decay or 0.0)
        self._apply_decay_param_fun = apply_decay_param_fun
        self._beta1 = beta1
        self._decay_rate = float(decay_rate)
        self._eps = (float(eps[0]), float(eps[1]))
        self._clip_threshold = float(clip_threshold)
        self._multi_precision = bool(multi_precision)
        # Per parameter name: {"step": int, "exp_avg_sq_row"/"exp_avg_sq_col" or "exp_avg_sq", "exp_avg"}.
        self._state: Dict[str, dict] = {}

    # ----------------------------------------------------------------------------------------------
    # The update

    @paddle.no_grad()
    def step(self):
        gathered = self._step_gradients()
        if gathered is None or not gathered[0]:
            return
        params_grads, decays = gathered
        if self._grad_clip is not None:  # one call: a global norm is over all parameters together
            params_grads = self._grad_clip(params_grads)

        base_lr = self.get_lr()
        for param, grad in params_grads:
            attr = getattr(param, "optimize_attr", None) or {}
            lr = base_lr * float(attr.get("learning_rate", 1.0))
            decay = decays[id(param)]
            if decay and self._apply_decay_param_fun is not None and not self._apply_decay_param_fun(param.name):
                decay = 0.0
            self._update(param, grad, lr, decay)

    def _update(self, param, grad, lr: float, decay: float):
        state = self._state.get(param.name)
        if state is None:
            state = self._state[param.name] = self._init_state(param)
        state["step"] += 1
        beta2t = 1.0 - state["step"] ** self._decay_rate
        grad = grad.astype("float32")

        squared = grad * grad + self._eps[0]
        if "exp_avg_sq_row" in state:
            row = beta2t * state["exp_avg_sq_row"] + (1.0 - beta2t) * squared.mean(axis=-1)
            col = beta2t * state["exp_avg_sq_col"] + (1.0 - beta2t) * squared.mean(axis=-2)
            state["exp_avg_sq_row"], state["exp_avg_sq_col"] = row, col
            row_factor = paddle.rsqrt(row / row.mean(axis=-1, keepdim=True)).unsqueeze(-1)
            col_factor = paddle.rsqrt(col).unsqueeze(-2)
            update = row_factor * col_factor * grad
        else:
            full = beta2t * state["exp_avg_sq"] + (1.0 - beta2t) * squared
            state["exp_avg_sq"] = full
            update = paddle.rsqrt(full) * grad
        del squared

        rms = paddle.sqrt((update * update).mean())
        update = update / paddle.clip(rms / self._clip_threshold, min=1.0)
        update = update * lr
        if self._beta1 is not None:
            state["exp_avg"] = self._beta1 * state["exp_avg"] + (1.0 - self._beta1) * update
            update = state["exp_avg"]

        weight = self._weight(param)
        master = self._master_weights.get(param.name)
        if decay:
            weight = weight - (lr * decay) * weight
        weight = weight - update
        if master is not None:
            self._master_weights[param.name] = weight
        paddle.assign(weight.astype(param.dtype), output=param)

    def _state_shapes(self, param) -> Dict[str, list]:
        """The shape of each moment tensor a parameter gets."""
        shape = list(param.shape)
        if len(shape) >= 2:
            shapes = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        else:
            shapes = {"exp_avg_sq": shape}
        if self._beta1 is not None:
            shapes["exp_avg"] = shape
        return shapes

    def _init_state(self, param) -> dict:
        state = {"step": 0}
        for kind, shape in self._state_shapes(param).items():
            state[kind] = paddle.zeros(shape, dtype="float32")
        return state

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Every state tensor keyed `<param.name>_adafactor_<kind>`, plus master weights and the scheduler."""
        return self._shared_state(self._per_parameter_state(_SUFFIX))

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned (tensors are copied), for the parameters this optimizer holds."""
        self._load_shared_state(state_dict)

        ours = [key for key in state_dict if _SUFFIX in key]
        others = [key for key in state_dict if key not in ("LR_Scheduler", "master_weights") and _SUFFIX not in key]
        if others and not ours:
            raise ValueError(f"not an Adafactor state dict (keys such as {others[:3]})")

        self._load_per_parameter_state(state_dict, _SUFFIX, self._state_shapes)

    load_state_dict = set_state_dict


def _float32(tensor):
    return tensor if tensor.dtype == paddle.float32 else tensor.astype("float32")


def _to_tensor(value):
    return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)


def _fp32_copy(value):
    """A float32 tensor that shares no memory with `value` (a tensor or, from `return_numpy`, an array)."""
    return _to_tensor(value).astype("float32").clone()
