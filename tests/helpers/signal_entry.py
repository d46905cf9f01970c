"""Training entry that pauses mid-step so that a test can signal it from outside, at a known step.

    PAUSE_AT=<n> PAUSE_FILE=<path> python tests/helpers/signal_entry.py <train flags>

In the n-th forward pass (the middle of step n, without gradient accumulation) the run creates PAUSE_FILE
and waits, for at most a minute, until it has received SIGTERM or SIGINT; then the step goes on as usual.
With PAUSE_AFTER_SIGNAL=<seconds> the paused step then waits that long more (time for a second signal).
"""
import os
import sys
import time

from ppdreambooth.runtime import signals
from ppdreambooth import train
from ppdreambooth.modeling.model import DreamBoothModel

pause_at = int(os.environ["PAUSE_AT"])
seen = {"count": 0}
original_forward = DreamBoothModel.forward


def forward(self, *args, **kwargs):
    seen["count"] += 1
    if seen["count"] == pause_at:
        with open(os.environ["PAUSE_FILE"], "w") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not (signals.current() and signals.current().requested) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(os.environ.get("PAUSE_AFTER_SIGNAL", "0")))
    return original_forward(self, *args, **kwargs)


DreamBoothModel.forward = forward

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
