"""Prodigy for Paddle dygraph: Adam whose step size d is estimated while training (`--optim prodigy`).

Prodigy (Mishchenko & Defazio, 2023, arXiv 2306.06101) is Adam with a step size d that it learns: it starts
tiny (d0) and grows while the gradients keep pointing the way the weights have already moved. It is used
with a learning rate of 1.0, which then only scales the estimated d (a schedule or warmup still applies
on top). Neither Paddle 3.3.1, PaddleNLP 2.8.1 nor ppdiffusers ships it, so it is written here by hand,
following the published reference implementation (the `prodigyopt` package, class `Prodigy`, with its
default `slice_p=1`) and structured like `ppdreambooth.modeling.optimizers.Adafactor`.

One optimizer step k (0, 1, ...) with the schedule's rate lr, and for every parameter p with gradient g
and rate multiplier m = p.optimize_attr["learning_rate"] (1 unless set) such that lr * m > 0 (the others
are left alone, state included):

    bc          = sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))  if use_bias_correction else 1
    dlr         = d * lr * bc                                          # d from the previous step (d0 at first)
    g           = g + weight_decay * p                                 # only with decouple=False
    numerator   = beta3 * numerator + sum_p (d / d0) * dlr * m * dot(g, p0 - p)      # p0: p when first seen
    m1          = beta1 * m1 + d * (1 - beta1) * g
    v           = beta2 * v + d ** 2 * (1 - beta2) * g ** 2
    s           = beta3 * s + (d / d0) * c * m * g       with c = d if safeguard_warmup else dlr
    denominator = sum_p sum(|s|)
    (if denominator == 0, e.g. at a warmup's lr = 0: stop here; m1, v, s keep this update, numerator, d, k not)
    d_hat       = d_coef * numerator / denominator
    d           = max(d, d_hat)                          only while d is still d0
    d_max       = max(d_max, d_hat)
    d           = min(d_max, d * growth_rate)            (the new d)
    p           = p - weight_decay * dlr * m * p                       # decoupled decay (decouple=True)
    p           = p - dlr * m * m1 / (sqrt(v) + d * eps)               # beta1 > 0
    p           = p - dlr * m * d * g / (sqrt(v) + d * eps)            # beta1 == 0: no first moment
                  (the decay and the step are applied as one update: the weights are rounded once)
    k           = k + 1

Defaults, as in prodigyopt: betas (0.9, 0.999), beta3 = sqrt(beta2) when None, eps 1e-8, d0 1e-6,
d_coef 1.0, growth_rate inf (d may grow without limit), decoupled weight decay (AdamW style),
use_bias_correction False, safeguard_warmup False (True keeps lr, i.e. a warmup, out of s).

Per-parameter rate multipliers. prodigyopt refuses parameter groups whose rate differs from the largest
one unless it is 0. ppdreambooth gives a trained text encoder its own rate as a multiplier in
`optimize_attr["learning_rate"]` (`DreamBoothModel.set_text_encoder_learning_rate`; parameter groups would
make Paddle clip each group on its own), so here the multiplier m scales that parameter's step, its decay
and its terms in d's numerator and in s, as written above; the moments m1 and v do not depend on it. m = 0
means the parameter neither moves nor contributes to d: it gets no state, or keeps its state untouched if it
had some (how `--stop_text_encoder_training` freezes the text encoder). prodigyopt's lr = 0 groups
contribute nothing either, but still get the decoupled decay and a step from their (stale) first moment;
here they do not move at all, as with Paddle's AdamW and a multiplier of 0.

d is one number for the whole model: its numerator and denominator are sums over all parameters. Under data
parallelism the gradients are all-reduced before `step()`, so every rank computes the same sums and the same
d. When each rank updates only its own share of the parameters (sharding), the sums must be added up across
the ranks that share the model: `_global_sums(numerator, denominator)` is the hook for that. By default it
returns the local sums; with `sharded=True` it all-reduces them with `paddle.distributed.all_reduce` over
`group` (the sharding group; None: all processes); a subclass may override it. Every rank must then call
`step()` every step, even with no parameter of its own. ppdreambooth's `--sharding` does not use this
optimizer (the sharding wrappers drive `_apply_optimize` and split the state dict by parameter name, neither
of which Prodigy implements); the hook is tested in one process only.

State: per parameter p0 (the initial weights, needed by d's numerator; a single 0 when they are all zero,
as LoRA's up-projections start), s, v and, with beta1 > 0, m1: four float32 tensors per weight against
AdamW's two. The state is float32 whatever the parameter dtype: bf16/fp16 weights are updated from a float32
computation and rounded back, or, with `multi_precision=True` (PaddleNLP passes it under `--fp16_opt_level
O2`), through a float32 master copy. Gradient clipping (`grad_clip`, e.g. `paddle.nn.ClipGradByGlobalNorm`)
runs once over the gradients of all parameters before the update. The step is skipped when the grad
scaler's `found_inf` flag is set. Dot products and |s| sums are float32 on the device; they are added up in
float64 on the host, where d, d_max and the numerator live (one device-to-host copy per step).

`state_dict()` keys every tensor by parameter name (`<param.name>_prodigy_<kind>`, kind p0, s, exp_avg_sq,
exp_avg, step) and stores d, d_max, the numerator and k as `prodigy_d`, `prodigy_d_max`,
`prodigy_d_numerator` (float64) and `prodigy_k` (int64), so PaddleNLP's Trainer saves it as
`optimizer.pdopt` and a resumed run continues exactly.

Limits: dygraph only (call `step()`); the per-parameter terms follow prodigyopt with `slice_p=1` (no
subsampling) and without `fsdp_in_use` auto-detection; PaddleNLP's unified checkpoints and sharding are
untested with this class.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import paddle

from ppdreambooth.modeling.optimizers import HandWrittenOptimizer, _float32, _fp32_copy, _to_tensor

logger = logging.getLogger(__name__)

_SUFFIX = "_prodigy_"
_SCALAR_PREFIX = "prodigy_"  # + d, d_max, d_numerator, k: the optimizer-wide numbers
_SCALARS = ("d", "d_max", "d_numerator", "k")


class Prodigy(HandWrittenOptimizer):
    """Adam with Prodigy's estimated step size (see the module docstring for the update rule)."""

    def __init__(
        self,
        learning_rate=1.0,
        parameters=None,
        betas: Tuple[float, float] = (0.9, 0.999),
        beta3: Optional[float] = None,
        eps: float = 1e-8,
        weight_decay: Optional[float] = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        grad_clip=None,
        apply_decay_param_fun: Optional[Callable[[str], bool]] = None,
        multi_precision: bool = False,
        sharded: bool = False,
        group=None,
        name: Optional[str] = None,
    ):
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if isinstance(learning_rate, float) and not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive (Prodigy is used with 1.0), got {learning_rate}")
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError("Prodigy takes its weight decay as a number, not a regularizer")
        beta1, beta2 = (float(b) for b in betas)
        for index, beta in enumerate((beta1, beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta}")
        if beta3 is not None and not 0.0 <= beta3 < 1.0:
            raise ValueError(f"beta3 must be None or in [0, 1), got {beta3}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not d0 > 0:
            raise ValueError(f"d0 must be positive, got {d0}")
        if not d_coef > 0:
            raise ValueError(f"d_coef must be positive, got {d_coef}")
        if not growth_rate > 0:
            raise ValueError(f"growth_rate must be positive, got {growth_rate}")
        # The base class keeps the rate, the parameters (or groups) and grad_clip. Weight decay is not handed
        # to it: it would become an L2 term added by the base class, not the decay written out above.
        super().__init__(learning_rate=learning_rate, parameters=parameters, weight_decay=None,
                         grad_clip=grad_clip, name=name)
        self._weight_decay = float(weight_decay or 0.0)
        self._apply_decay_param_fun = apply_decay_param_fun
        self._beta1, self._beta2 = beta1, beta2
        self._beta3 = math.sqrt(beta2) if beta3 is None else float(beta3)
        self._eps = float(eps)
        self._decouple = bool(decouple)
        self._use_bias_correction = bool(use_bias_correction)
        self._safeguard_warmup = bool(safeguard_warmup)
        self._d0 = float(d0)
        self._d_coef = float(d_coef)
        self._growth_rate = float(growth_rate)
        self._multi_precision = bool(multi_precision)
        self._sharded = bool(sharded)
        self._group = group
        # The optimizer-wide numbers (saved) ...
        self._d, self._d_max, self._d_numerator, self._k = self._d0, self._d0, 0.0, 0
        # ... and two of the last step's, for logging (not saved).
        self._d_hat, self._d_denom = None, None
        # Per parameter name: {"step": int, "p0", "s", "exp_avg_sq" and, with beta1 > 0, "exp_avg"}.
        self._state: Dict[str, dict] = {}

    @property
    def d(self) -> float:
        """The current step-size estimate (the effective rate of a parameter is d * lr * multiplier)."""
        return self._d

    # ----------------------------------------------------------------------------------------------
    # The update

    def _global_sums(self, numerator: float, denominator: float) -> Tuple[float, float]:
        """d's numerator increment and denominator summed over every process that holds part of the model.

        Called once per step with this process's sums (plain floats). Without `sharded` every process holds
        all parameters (and the same all-reduced gradients), so the local sums are the global ones.
        """
        if not self._sharded:
            return numerator, denominator
        sums = paddle.to_tensor([numerator, denominator], dtype="float64")
        paddle.distributed.all_reduce(sums, group=self._group)
        total_numerator, total_denominator = (float(v) for v in sums.numpy())
        return total_numerator, total_denominator

    def _gradient(self, grad, weight, decay: float):
        grad = _float32(grad)
        if decay and not self._decouple:  # coupled (L2) decay enters the gradient and everything built from it
            grad = grad + decay * weight
        return grad

    @paddle.no_grad()
    def step(self):
        gathered = self._step_gradients()
        if gathered is None:
            return
        params_grads, decays = gathered
        if not params_grads and not self._sharded:  # sharded: the other ranks still wait for our sums
            return
        if params_grads and self._grad_clip is not None:  # one call: a global norm is over all parameters
            params_grads = self._grad_clip(params_grads)

        lr = float(self.get_lr())
        beta1, beta2, beta3 = self._beta1, self._beta2, self._beta3
        d, d0, k = self._d, self._d0, self._k
        bias_correction = 1.0
        if self._use_bias_correction:
            bias_correction = math.sqrt(1.0 - beta2 ** (k + 1)) / (1.0 - beta1 ** (k + 1))
        dlr = d * lr * bias_correction

        # First pass: moments and s, and each parameter's terms of d's numerator and denominator.
        active, coefficients, terms = [], [], []
        for param, grad in params_grads:
            attr = getattr(param, "optimize_attr", None) or {}
            multiplier = float(attr.get("learning_rate", 1.0))
            if not lr * multiplier > 0:
                continue  # rate 0: neither moves nor counts towards d
            decay = decays[id(param)]
            if decay and self._apply_decay_param_fun is not None and not self._apply_decay_param_fun(param.name):
                decay = 0.0
            weight = self._weight(param)
            state = self._state.get(param.name)
            if state is None:
                state = self._state[param.name] = self._init_state(param, weight)
            g = self._gradient(grad, weight, decay)

            terms.append((g * (state["p0"] - weight)).sum())
            coefficients.append((d / d0) * dlr * multiplier)
            if beta1 > 0:
                state["exp_avg"] = beta1 * state["exp_avg"] + (d * (1.0 - beta1)) * g
            state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (d * d * (1.0 - beta2)) * (g * g)
            scale = d if self._safeguard_warmup else dlr
            state["s"] = beta3 * state["s"] + ((d / d0) * scale * multiplier) * g
            terms.append(state["s"].abs().sum())
            active.append((param, grad, state, multiplier, decay))
            del g, weight

        numerator, denominator = 0.0, 0.0
        if terms:  # one device-to-host copy; the sums in float64
            values = paddle.stack([t.reshape([]) for t in terms]).numpy().astype(np.float64)
            numerator = float(np.dot(np.asarray(coefficients, dtype=np.float64), values[0::2]))
            denominator = float(values[1::2].sum())
        delta_numerator, denominator = self._global_sums(numerator, denominator)
        if denominator == 0:
            return  # no gradient yet (or lr = 0): nothing to estimate d from, no step

        global_numerator = beta3 * self._d_numerator + delta_numerator
        d_hat = self._d_coef * global_numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(self._d_max, d_hat)
        d = min(d_max, d * self._growth_rate)
        self._d, self._d_max, self._d_numerator = d, d_max, global_numerator
        self._d_hat, self._d_denom = d_hat, denominator

        # Second pass: the step, with the new d in eps's place and in the beta1 == 0 step.
        for param, grad, state, multiplier, decay in active:
            state["step"] += 1
            weight = self._weight(param)
            denom = paddle.sqrt(state["exp_avg_sq"]) + d * self._eps
            rate = dlr * multiplier
            if beta1 > 0:
                update = rate * (state["exp_avg"] / denom)
            else:  # the gradient of the first pass (with coupled decay, from the weights before this step)
                update = (rate * d) * (self._gradient(grad, weight, decay) / denom)
            if decay and self._decouple:  # added to the update first: the weights are rounded once per step
                update = update + (decay * rate) * weight
            weight = weight - update
            del update, denom
            if param.name in self._master_weights:
                self._master_weights[param.name] = weight
            paddle.assign(weight.astype(param.dtype), output=param)
        self._k = k + 1

    def _state_shapes(self, param) -> Dict[str, list]:
        """The shape of each state tensor a parameter gets (p0 may also be a single 0, shape [])."""
        shape = list(param.shape)
        shapes = {"p0": shape, "s": shape, "exp_avg_sq": shape}
        if self._beta1 > 0:
            shapes["exp_avg"] = shape
        return shapes

    def _init_state(self, param, weight) -> dict:
        state = {"step": 0}
        for kind, shape in self._state_shapes(param).items():
            state[kind] = paddle.zeros(shape, dtype="float32")
        if bool(weight.any()):
            state["p0"] = weight.clone()
        else:  # all zero (a LoRA up-projection, a bias): one number instead of a copy
            state["p0"] = paddle.zeros([], dtype="float32")
        return state

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Every state tensor keyed `<param.name>_prodigy_<kind>`, d, d_max, the numerator and k as
        `prodigy_<name>`, plus master weights and the scheduler."""
        result = self._per_parameter_state(_SUFFIX)
        for kind in _SCALARS:
            value = getattr(self, "_" + kind)
            result[_SCALAR_PREFIX + kind] = paddle.to_tensor(value, dtype="int64" if kind == "k" else "float64")
        return self._shared_state(result)

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned (tensors are copied), for the parameters this optimizer holds."""
        ours = [key for key in state_dict if _SUFFIX in key]
        scalars = self._checked_scalars(state_dict, _SUFFIX, _SCALAR_PREFIX, _SCALARS, "a Prodigy")
        self._load_shared_state(state_dict)

        loaded = set()
        for param, _ in self._params_with_decay():
            step_key = param.name + _SUFFIX + "step"
            if step_key not in state_dict:
                continue  # no state saved for it (no gradient or a rate of 0 so far): it starts fresh
            state = {"step": int(_to_tensor(state_dict[step_key]).item())}
            for kind, shape in self._state_shapes(param).items():
                key = param.name + _SUFFIX + kind
                if key not in state_dict:
                    raise ValueError(f"optimizer state {key} missing from the state dict")
                state[kind] = _fp32_copy(state_dict[key])
                got = list(state[kind].shape)
                if got != shape and not (kind == "p0" and got == []):
                    raise ValueError(f"optimizer state {key} has shape {got}, expected {shape}")
            self._state[param.name] = state
            loaded.update(param.name + _SUFFIX + kind for kind in state)
        self._d, self._d_max, self._d_numerator = (float(scalars[kind]) for kind in ("d", "d_max", "d_numerator"))
        self._k = int(scalars["k"])
        unused = sorted(set(ours) - loaded)
        if unused:
            logger.warning("Prodigy: %d saved state tensors match no parameter, e.g. %s", len(unused), unused[:3])

    load_state_dict = set_state_dict

