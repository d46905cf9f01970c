"""Gradient clipping by global norm, with the arithmetic of Paddle's `ClipGradByGlobalNorm` at a fraction
of its per-step cost.

Why by hand: Paddle 3.3's dygraph clip scales every gradient through the public `paddle.multiply` (plus a
`getattr`/dtype/mesh check per parameter) into a new tensor, a cost that grows with the number of trained
tensors (SDXL's UNet has ~2,500; the measured share of a step is in the README's speed section). This class computes the same norm the same way (per-tensor squared L2 norms,
summed per dtype group in the same order, then sqrt) and multiplies each gradient in place by the same
factor `max_norm / max(norm, max_norm)`, so the clipped gradients are bit-identical (tested), in less time
(`benchmarks/bench_clipping.py` prints both).

Anything outside the plain case (distributed tensors with a process mesh, sharding/model-parallel norm
groups, sparse gradients) is handed to Paddle's own implementation unchanged.
"""
from __future__ import annotations

import paddle
from paddle import _C_ops
from paddle.nn.clip import _squared_l2_norm

_LOW_PRECISION = (paddle.float16, paddle.bfloat16)


class GlobalNormClip(paddle.nn.ClipGradByGlobalNorm):
    """`paddle.nn.ClipGradByGlobalNorm(clip_norm)` with a faster plain path; same results."""

    def _is_plain(self, params_grads) -> bool:
        if getattr(self, "should_comm_on_shard_dim", False):
            return False
        for _, grad in params_grads:
            if grad is not None and (grad.process_mesh is not None or grad.is_selected_rows()):
                return False
        return True

    @paddle.no_grad()
    def _dygraph_clip(self, params_grads):
        if self.auto_skip_clip or not self._is_plain(params_grads):
            return super()._dygraph_clip(params_grads)
        clipped = [(p, g) for p, g in params_grads if g is not None and getattr(p, "need_clip", True) is not False]
        if not clipped:
            return params_grads
        grads = [grad for _, grad in clipped]
        all_float32 = {grad.dtype for grad in grads} == {paddle.float32}
        factor = self._factor(grads, all_float32)
        factors, result = {}, []  # per gradient dtype (mixed precision only)
        for param, grad in params_grads:
            if grad is None:  # dropped, as Paddle's clip drops it
                continue
            if getattr(param, "need_clip", True) is not False:
                scale = factor if all_float32 else factors.get(grad.dtype)
                if scale is None:
                    scale = factors[grad.dtype] = factor if factor.dtype == grad.dtype else factor.astype(grad.dtype)
                if grad.ndim == 0:  # a 0-d gradient would change shape in place: Paddle's out-of-place product
                    grad = paddle.multiply(grad, scale)
                else:
                    _C_ops.multiply_(grad, scale)  # in place: the same product, no new tensor
            result.append((param, grad))
        return result

    def _factor(self, grads, all_float32: bool) -> paddle.Tensor:
        """max_norm / max(global norm, max_norm), with Paddle's order of operations."""
        if all_float32:  # the usual case: one group, no casts, no per-tensor dtype checks
            sum_dtype = "float32"
            partial = [paddle.stack([_C_ops.squared_l2_norm(grad) for grad in grads]).sum()]
        else:  # Paddle's grouping by the squares' dtype (half-precision squares may be cast to float32)
            groups = {"low": [], "fp32": [], "fp64": []}  # Paddle's order of summation
            for grad in grads:
                square = _squared_l2_norm(grad)
                key = "low" if square.dtype in _LOW_PRECISION else "fp32" if square.dtype == paddle.float32 else "fp64"
                groups[key].append(square)
            sum_dtype = "float64" if groups["fp64"] else "float32"
            partial = [paddle.stack(squares).sum() for squares in groups.values() if squares]
            partial = [p if p.dtype == getattr(paddle, sum_dtype) else p.astype(sum_dtype) for p in partial]
        norm = paddle.sqrt(paddle.stack(partial).sum())
        max_norm = paddle.full(shape=[1], dtype=sum_dtype, fill_value=self.clip_norm)
        return paddle.divide(x=max_norm, y=paddle.maximum(x=norm, y=max_norm))


def faster_clip(clip):
    """The optimizer's clip with the fast path, when it is a plain `ClipGradByGlobalNorm`; else unchanged."""
    if type(clip) is paddle.nn.ClipGradByGlobalNorm:
        return GlobalNormClip(clip.clip_norm, group_name=clip.group_name, auto_skip_clip=clip.auto_skip_clip)
    return clip
