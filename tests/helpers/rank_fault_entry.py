"""Training entry for the data-parallel fault tests: one rank meets a fault, and each rank records how it ended.

    FAULT=<point>:<n> FAULT_RANK=<r> OUTCOME_DIR=<dir> python -m paddle.distributed.launch ... rank_fault_entry.py <flags>

Points (each fires on the n-th forward pass of rank r only):
  nan_in_step    the loss becomes NaN
  raise_in_step  the forward pass raises RuntimeError("injected fault")
Each rank writes <OUTCOME_DIR>/rank-<rank>.exit holding its exit status, just before it exits, and exits the way
the command-line entry points do (`exit_process`). SLOW_EXIT_RANK=<r> makes rank r take 2 s longer to shut down
(a pause in the log flushing of `exiting.leave_distributed_job`, after it has started ignoring SIGTERM), long
enough for the launcher to notice another rank's non-zero exit and SIGTERM this one.
"""
import logging
import os
import sys
import time

from ppdreambooth import train
from ppdreambooth.modeling.model import DreamBoothModel
from ppdreambooth.runtime.exiting import exit_process

point, _, nth = os.environ["FAULT"].partition(":")
nth = int(nth or 1)
rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
seen = {"count": 0}

if rank == int(os.environ.get("FAULT_RANK", "1")):
    original_forward = DreamBoothModel.forward

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        seen["count"] += 1
        if seen["count"] == nth:
            if point == "nan_in_step":
                out["loss"] = out["loss"] * float("nan")
            elif point == "raise_in_step":
                raise RuntimeError("injected fault")
        return out

    DreamBoothModel.forward = forward


def record(status: int) -> None:
    folder = os.environ.get("OUTCOME_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank-{rank}.exit"), "w") as f:
            f.write(f"{status}\n")


if __name__ == "__main__":
    if os.environ.get("SLOW_EXIT_RANK") == str(rank):
        flush_logs = logging.shutdown

        def slow_flush(*args, **kwargs):
            time.sleep(2.0)
            return flush_logs(*args, **kwargs)

        logging.shutdown = slow_flush
    try:
        status = train.main(sys.argv[1:])
    except BaseException:
        record(1)
        raise
    record(status)
    exit_process(status)
