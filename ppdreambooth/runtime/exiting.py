"""Ending a command-line process without the interpreter's final sweep over every object."""
from __future__ import annotations

import gc
import os
import signal
import sys
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """`sys.exit(status)`, minus the garbage collection Python runs over all objects as it shuts down.

    After Paddle and PaddleNLP are imported that sweep takes a noticeable time (`benchmarks/bench_startup.py`
    prints it; the README's speed section has the figure) and frees nothing the operating system would not reclaim at
    once. Freezing the objects first leaves them out of it; output streams, logging handlers and `atexit`
    functions are flushed and run as usual.

    Not in a process of a multi-process job: there Paddle's communication objects need the sweep to be torn
    down in order (skipping it aborted a `--sharding stage1` rank at exit). There, instead, the rank ignores
    SIGTERM while it shuts down: `paddle.distributed.launch` sends SIGTERM to every rank still running as soon as
    one rank has exited with a non-zero status, so a rank that ended the same way (the same NaN stop, the same
    input error) but was a moment slower to tear down used to die of that signal (Paddle's handler aborts it:
    exit -6, the launcher reporting 250) instead of ending with its own status. This rank has nothing left to
    save; it finishes exiting. SIGINT and SIGKILL still end it."""
    if _in_distributed_job():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        gc.freeze()
    sys.exit(status)


def _in_distributed_job() -> bool:
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1) > 1:  # set by paddle.distributed.launch
        return True
    paddle = sys.modules.get("paddle")
    try:
        return paddle is not None and paddle.distributed.is_initialized()
    except Exception:  # an older or partial Paddle: be safe
        return True
