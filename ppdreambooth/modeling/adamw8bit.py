"""AdamW with 8-bit optimizer state for Paddle dygraph (`--optim adamw_8bit`).

AdamW keeps two float32 moments per trained weight (8 bytes). Dettmers et al. 2022 ("8-bit Optimizers via
Block-wise Quantization", the bitsandbytes `Adam8bit`) store both as uint8 codes into a dynamic quantization
map, block-wise with one float32 absmax per block: about 2 bytes per weight. bitsandbytes is CUDA/PyTorch only,
and neither Paddle 3.3.1, PaddleNLP 2.8.1 (whose optimizer names are adamw and adafactor) nor ppdiffusers
offers an 8-bit optimizer, so it is written here, structured like the other hand-written optimizers
(`optimizers.HandWrittenOptimizer`). The map and the block-wise quantization are in
`ppdreambooth.modeling.quantization` (signed map for m, unsigned for v, blocks of 256).

One step for a parameter p with gradient g, its own step count t (1, 2, ...), the schedule's rate lr and the
parameter's rate multiplier mult = p.optimize_attr["learning_rate"] (1 unless set; 0 leaves the parameter and
its state untouched, as `--stop_text_encoder_training` needs):

    m, v  = dequantize(m codes, m absmax), dequantize(v codes, v absmax)   (zeros at t = 1)
    m     = beta1 * m + (1 - beta1) * g
    v     = beta2 * v + (1 - beta2) * g ** 2
    u     = (m / (1 - beta1 ** t)) / (sqrt(v / (1 - beta2 ** t)) + eps)
    p     = p - lr * mult * (u + weight_decay * p)          (decoupled decay, where apply_decay_param_fun says so)
    m codes, m absmax = quantize(m);  v codes, v absmax = quantize(v)

i.e. the ordinary AdamW update computed in float32 from the freshly updated moments; only what is kept between
steps is quantized. Parameters with fewer than `min_8bit_size` = 4096 elements (bitsandbytes' default:
biases, norms, small LoRA matrices) keep float32 m and v and so take exactly AdamW's step; their memory is
negligible. The step's working memory is a few float32 copies of the parameter being updated, one parameter
at a time.

The state is float32 or uint8 whatever the parameter dtype: bf16/fp16 weights are updated from a float32
computation and rounded back, or, with `multi_precision=True` (PaddleNLP passes it under O2), through a float32
master copy. Gradient clipping (`grad_clip`) runs once over all gradients before the update; a step is skipped
when the grad scaler's `found_inf` flag is set.

`state_dict()` keys by parameter name: `<param.name>_adamw8bit_<kind>` with kind step (int64) and either
exp_avg_codes / exp_avg_sq_codes (uint8, [numel]) and exp_avg_absmax / exp_avg_sq_absmax (float32, [blocks]),
or, for small parameters, exp_avg / exp_avg_sq (float32, the parameter's shape); `adamw8bit_block_size` (int64)
guards against loading codes made with other blocks. A resumed run continues bit for bit.

Limits: dygraph only; no sharding (the sharding wrappers drive `_apply_optimize` and split AdamW-style
accumulators, neither of which this class has); PaddleNLP's unified checkpoints are untested.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import paddle

from ppdreambooth.modeling.optimizers import HandWrittenOptimizer, _float32, _fp32_copy, _to_tensor
from ppdreambooth.modeling.quantization import BLOCK_SIZE, BlockQuantizer


_SUFFIX = "_adamw8bit_"
_SCALAR_PREFIX = "adamw8bit_"
_SCALARS = ("block_size",)
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller parameters keep float32 state
_QUANTIZED_KINDS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
_FLOAT_KINDS = ("exp_avg", "exp_avg_sq")


class AdamW8bit(HandWrittenOptimizer):
    """AdamW whose moments are kept as block-wise 8-bit codes (see the module docstring)."""

    def __init__(
        self,
        learning_rate=0.001,
        parameters=None,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: Optional[float] = 0.01,
        grad_clip=None,
        apply_decay_param_fun: Optional[Callable[[str], bool]] = None,
        multi_precision: bool = False,
        min_8bit_size: int = MIN_8BIT_SIZE,
        block_size: int = BLOCK_SIZE,
        name: Optional[str] = None,
    ):
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if isinstance(learning_rate, float) and learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError("AdamW8bit takes its weight decay as a number, not a regularizer")
        for index, beta in enumerate((beta1, beta2)):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"beta{index + 1} must be in [0, 1), got {beta}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        # Weight decay is not handed to the base class: it would become an L2 term on the gradient.
        super().__init__(learning_rate=learning_rate, parameters=parameters, weight_decay=None,
                         grad_clip=grad_clip, name=name)
        self._weight_decay = float(weight_decay or 0.0)
        self._apply_decay_param_fun = apply_decay_param_fun
        self._beta1, self._beta2 = float(beta1), float(beta2)
        self._eps = float(epsilon)
        self._multi_precision = bool(multi_precision)
        self._min_8bit_size = int(min_8bit_size)
        self._block_size = int(block_size)
        self._signed = BlockQuantizer(signed=True, block_size=self._block_size)  # m
        self._unsigned = BlockQuantizer(signed=False, block_size=self._block_size)  # v
        # Per parameter name: {"step": int, and the quantized or the float kinds}.
        self._state: Dict[str, dict] = {}

    def is_quantized(self, param) -> bool:
        """Whether this parameter's moments are (or would be) kept as 8-bit codes."""
        state = self._state.get(param.name)
        if state is not None:
            return "exp_avg_codes" in state
        return int(param.numel()) >= self._min_8bit_size

    # ----------------------------------------------------------------------------------------------
    # The update

    @paddle.no_grad()
    def step(self):
        gathered = self._step_gradients()
        if gathered is None or not gathered[0]:
            return  # the grad scaler found an overflow, or no gradient: no step
        params_grads, decays = gathered
        if self._grad_clip is not None:  # one call: a global norm is over all parameters together
            params_grads = self._grad_clip(params_grads)
        base_lr = float(self.get_lr())
        for param, grad in params_grads:
            attr = getattr(param, "optimize_attr", None) or {}
            rate = base_lr * float(attr.get("learning_rate", 1.0))
            if not rate > 0:
                continue  # frozen (or a zero rate): weights and state stay as they are
            decay = decays[id(param)]
            if decay and self._apply_decay_param_fun is not None and not self._apply_decay_param_fun(param.name):
                decay = 0.0
            self._update(param, grad, rate, decay)

    def _moments(self, param, state) -> Tuple[paddle.Tensor, paddle.Tensor]:
        if "exp_avg_codes" in state:
            shape = list(param.shape)
            return (self._signed.dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], shape),
                    self._unsigned.dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], shape))
        return state["exp_avg"], state["exp_avg_sq"]

    def _keep_moments(self, state, exp_avg, exp_avg_sq) -> None:
        if "exp_avg_codes" in state:
            state["exp_avg_codes"], state["exp_avg_absmax"] = self._signed.quantize(exp_avg)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = self._unsigned.quantize(exp_avg_sq)
        else:
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

    def _update(self, param, grad, rate: float, decay: float) -> None:
        state = self._state.get(param.name)
        if state is None:
            state = self._state[param.name] = self._init_state(param)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = self._beta1, self._beta2
        g = _float32(grad)
        exp_avg, exp_avg_sq = self._moments(param, state)
        exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * (g * g)
        del g
        update = (exp_avg / (1.0 - beta1 ** t)) / (paddle.sqrt(exp_avg_sq / (1.0 - beta2 ** t)) + self._eps)
        self._keep_moments(state, exp_avg, exp_avg_sq)
        del exp_avg, exp_avg_sq
        weight = self._weight(param)
        if decay:
            update = update + decay * weight
        weight = weight - rate * update
        if param.name in self._master_weights:
            self._master_weights[param.name] = weight
        paddle.assign(weight.astype(param.dtype), output=param)

    def _state_shapes(self, param, quantized: bool) -> Dict[str, Tuple[list, str]]:
        """kind -> (shape, dtype) of a parameter's state tensors."""
        numel = int(param.numel())
        if quantized:
            blocks = [self._signed.num_blocks(numel)]
            return {"exp_avg_codes": ([numel], "uint8"), "exp_avg_absmax": (blocks, "float32"),
                    "exp_avg_sq_codes": ([numel], "uint8"), "exp_avg_sq_absmax": (blocks, "float32")}
        return {kind: (list(param.shape), "float32") for kind in _FLOAT_KINDS}

    def _init_state(self, param) -> dict:
        state = {"step": 0}
        for kind, (shape, dtype) in self._state_shapes(param, self.is_quantized(param)).items():
            state[kind] = paddle.zeros(shape, dtype=dtype)
        return state

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """Every state tensor keyed `<param.name>_adamw8bit_<kind>`, the block size as `adamw8bit_block_size`,
        plus master weights and the scheduler."""
        result = self._per_parameter_state(_SUFFIX)
        result[_SCALAR_PREFIX + "block_size"] = paddle.to_tensor(self._block_size, dtype="int64")
        return self._shared_state(result)

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned (tensors are copied), for the parameters this optimizer holds. Each
        parameter keeps the form its state was saved in (8-bit codes or float32)."""
        scalars = self._checked_scalars(state_dict, _SUFFIX, _SCALAR_PREFIX, _SCALARS, "an AdamW8bit")
        if int(scalars["block_size"]) != self._block_size:
            raise ValueError(f"the saved 8-bit state uses blocks of {int(scalars['block_size'])} values, this "
                             f"optimizer blocks of {self._block_size}")
        self._load_shared_state(state_dict)

        def shapes_of(param):  # each parameter keeps the form its state was saved in
            quantized = param.name + _SUFFIX + "exp_avg_codes" in state_dict
            return {kind: shape for kind, (shape, _) in self._state_shapes(param, quantized).items()}

        self._load_per_parameter_state(state_dict, _SUFFIX, shapes_of)

    def _restored(self, kind: str, value) -> paddle.Tensor:
        """Codes stay uint8 copies; absmax and float32 moments are float32 copies."""
        return _to_tensor(value).astype("uint8").clone() if kind.endswith("_codes") else _fp32_copy(value)

    load_state_dict = set_state_dict
