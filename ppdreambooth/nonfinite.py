"""A NaN/Inf loss is never applied and never saved, without reading the loss on the host at every step.

Per step everything stays on the device: whether the loss is finite (under data parallel, on any rank: one
all-reduce of a flag) and the first bad step. The flag goes to the optimizer as Paddle's `found_inf`, the
same switch the fp16 GradScaler uses, so the optimizer skips that step entirely (weights, moments, step
counts). Under fp16 the GradScaler's own overflow check does the skipping: a non-finite loss makes non-finite
gradients. The host reads the first bad step only when something is about to be logged or saved, and at the
end of training; then the run stops with `NonFiniteLossError`, naming the step (and ranks) where it happened.

The loss was read with `float(loss)` at every step before; on a GPU that blocked the host until the backward
pass had finished, so the optimizer's kernels could not be queued behind it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import paddle


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; that step was skipped and the run stopped before saving anything."""

    def __init__(self, step: int, value: float, ranks: Sequence[int] = (), stopped_at: Optional[int] = None):
        where = f" on rank {', '.join(map(str, ranks))}" if ranks else ""
        who = "every rank" if ranks else "training"
        at = f" at step {stopped_at}" if stopped_at is not None and stopped_at != step else ""
        super().__init__(
            f"the loss is {value} at step {step}{where}; the optimizer skipped that step (never applied it) and "
            f"{who} stopped{at} before saving anything. The last complete checkpoint is untouched and no final "
            "model was written. Usual causes: a learning rate that is too high (DreamBooth full fine-tuning: "
            "about 5e-6; LoRA: 1e-4), fp16 overflow (try --bf16 or fp32), or corrupt images. Resume with "
            "--resume_from_checkpoint latest after changing the cause."
        )
        self.step, self.value, self.ranks = step, value, list(ranks)


class NonFiniteGuard:
    """Device-side record of non-finite losses; `check()` is the only host read."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self._first_bad = None  # int64 [1]: the first step with a non-finite loss on any rank (0: none)
        self._local_first_bad = None  # the same on this rank
        self._local_value = None  # this rank's loss at its first bad step
        self._skip_step, self._skip = None, None  # the optimizer step being accumulated and its skip flag

    def observe(self, loss: paddle.Tensor, step: int) -> paddle.Tensor:
        """Record this (micro-)step's loss; returns the optimizer step's skip flag (bool [1], on the device):
        true when any micro-step of optimizer step `step`, on any rank, had a non-finite loss."""
        loss = loss.detach().astype("float32").reshape([1])
        if self._first_bad is None:
            self._first_bad = paddle.zeros([1], dtype="int64")
            self._local_first_bad = paddle.zeros([1], dtype="int64")
            self._local_value = paddle.zeros([1], dtype="float32")
        here = paddle.full([1], step, dtype="int64")
        bad = paddle.logical_not(paddle.isfinite(loss))
        first_here = paddle.logical_and(bad, self._local_first_bad == 0)
        self._local_first_bad = paddle.where(first_here, here, self._local_first_bad)
        self._local_value = paddle.where(first_here, loss, self._local_value)
        if self.world_size > 1:  # every rank skips (and later stops) together
            flag = bad.astype("int32")
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
            bad = flag > 0
        self._first_bad = paddle.where(paddle.logical_and(bad, self._first_bad == 0), here, self._first_bad)
        if self._skip_step == step:  # gradient accumulation: one bad micro-step spoils the optimizer step
            bad = paddle.logical_or(self._skip, bad)
        self._skip_step, self._skip = step, bad
        return bad

    def check(self, current_step: Optional[int] = None) -> None:
        """Raise `NonFiniteLossError` if any step so far had a non-finite loss. Under data parallel every rank
        must call it at the same point (they all get the same answer)."""
        if self._first_bad is None:
            return
        step = int(self._first_bad.item())
        if not step:
            return
        if self.world_size > 1:
            from . import ranks

            steps = ranks.gather_floats(self._local_first_bad)
            values = ranks.gather_floats(self._local_value)
            bad = [rank for rank, s in enumerate(steps) if int(s) == step]
            raise NonFiniteLossError(step, values[bad[0]], ranks=bad, stopped_at=current_step)
        raise NonFiniteLossError(step, float(self._local_value.item()), stopped_at=current_step)


def innermost_optimizer(optimizer):
    """The optimizer that applies the update (through fleet's hybrid-parallel/sharding wrappers)."""
    while hasattr(optimizer, "_inner_opt"):
        optimizer = optimizer._inner_opt
    return optimizer
