"""A NaN/Inf loss is never applied and never saved, and ppdreambooth no longer reads the loss on the host
at every step to ensure it.

Per step everything of ours stays on the device: whether the loss is finite (under data parallel, on any
rank: one all-reduce of a flag), kept with the step number until the next read. The flag goes to the
optimizer as Paddle's `found_inf`, the switch its fp16 GradScaler uses, so the optimizer skips that step
entirely (weights, moments, step counts). The host reads our record only when something is about to be
logged or saved, at the end of training, and at least every 256 steps; then the run stops with
`NonFiniteLossError`, naming the step (and ranks) where it happened.

What that saves depends on the precision, because Paddle decides a skip on the host (its dygraph optimizers
and its Adam kernels read `found_inf` as a host boolean):
- fp16: the GradScaler's overflow check does the skipping (a non-finite loss makes non-finite gradients) and
  is read every step anyway; ppdreambooth adds no read, where it used to add `float(loss)` right after the
  backward pass.
- fp32/bf16: Paddle's optimizer reads the flag once per step as it applies the update, after the clipping
  kernels have been queued, instead of ppdreambooth reading the loss before any of them could be.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
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

    MAX_PENDING = 256  # steps between host reads at most (a long --logging_steps without saving)

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        # (step, bad on any rank, bad on this rank, this rank's loss) per micro-step since the last check,
        # all on the device: two small ops per step, nothing is read
        self._pending: List[Tuple[int, paddle.Tensor, paddle.Tensor, paddle.Tensor]] = []
        self._skip_step, self._skip = None, None  # the optimizer step being accumulated and its skip flag

    def observe(self, loss: paddle.Tensor, step: int) -> paddle.Tensor:
        """Record this (micro-)step's loss; returns the optimizer step's skip flag (a bool tensor on the
        device): true when any micro-step of optimizer step `step`, on any rank, had a non-finite loss."""
        if len(self._pending) >= self.MAX_PENDING:  # every rank reaches this at the same step
            self.check(step)
        loss = loss.detach()
        local = paddle.logical_not(paddle.isfinite(loss))
        bad = local
        if self.world_size > 1:  # every rank skips (and later stops) together
            flag = local.astype("int32")
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
            bad = flag > 0
        self._pending.append((step, bad, local, loss))
        if self._skip_step == step:  # gradient accumulation: one bad micro-step spoils the optimizer step
            bad = paddle.logical_or(self._skip, bad)
        self._skip_step, self._skip = step, bad
        return bad

    def check(self, current_step: Optional[int] = None) -> None:
        """Raise `NonFiniteLossError` if any step so far had a non-finite loss. Under data parallel every rank
        must call it at the same point (they all get the same answer)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = paddle.stack([bad.reshape([]) for _, bad, _, _ in pending]).numpy()  # the host read
        if not flags.any():
            return
        first = int(np.argmax(flags))
        step = pending[first][0]
        local = [(s, lost) for s, _, here, lost in pending if s == step and bool(here)]
        value = float(local[0][1]) if local else float("nan")
        if self.world_size > 1:
            from ppdreambooth.runtime import ranks

            values = ranks.gather_floats(paddle.to_tensor(value if local else 0.0, dtype="float32"))
            bad_ranks = ranks.gather_floats(paddle.to_tensor(1.0 if local else 0.0, dtype="float32"))
            bad = [rank for rank, flag in enumerate(bad_ranks) if flag]
            raise NonFiniteLossError(step, values[bad[0]], ranks=bad, stopped_at=current_step)
        raise NonFiniteLossError(step, value, stopped_at=current_step)


def innermost_optimizer(optimizer):
    """The optimizer that applies the update (through fleet's hybrid-parallel/sharding wrappers)."""
    while hasattr(optimizer, "_inner_opt"):
        optimizer = optimizer._inner_opt
    return optimizer
