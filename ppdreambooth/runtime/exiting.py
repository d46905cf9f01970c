"""Ending a command-line process without the interpreter's final sweep over every object."""
from __future__ import annotations

import gc
import logging
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

    A rank of a multi-process job leaves through `leave_distributed_job` instead."""
    if _in_distributed_job():
        leave_distributed_job(status)
    gc.freeze()
    sys.exit(status)


def leave_distributed_job(status: int) -> NoReturn:
    """End a rank of a multi-process job without tearing down Paddle's communication objects.

    Their teardown at interpreter exit is fragile: with the sweep skipped it aborted a `--sharding stage1` rank;
    with the sweep, under load (two full test-suite runs beside other work, each launching several two-process
    jobs), one job per run had a rank that had finished and written everything abort silently at exit (-6; the
    launcher then reports 250 and the job fails). So a rank that
    succeeded first waits for the others at a barrier (no rank is still talking to its peers), then every rank
    flushes its output and logs and ends at once with `os._exit`, running no destructors. `atexit` functions do
    not run; what a run writes is on disk before this point.

    `paddle.distributed.launch` sends SIGTERM to every rank still running as soon as one rank has exited with a
    non-zero status; a rank that ended the same way (the same NaN stop, the same input error) but was a moment
    slower ignores it from here and ends with its own status (Paddle's handler would abort it: exit -6)."""
    if status == 0:
        try:
            import paddle

            if paddle.distributed.is_initialized():
                paddle.distributed.barrier()
        except Exception:  # a peer already gone: nothing to wait for
            pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _in_distributed_job() -> bool:
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1) > 1:  # set by paddle.distributed.launch
        return True
    paddle = sys.modules.get("paddle")
    try:
        return paddle is not None and paddle.distributed.is_initialized()
    except Exception:  # an older or partial Paddle: be safe
        return True
