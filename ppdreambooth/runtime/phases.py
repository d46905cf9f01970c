"""Phase markers for memory and time benchmarks: opt in with the environment variable `PPDB_PHASE_LOG=<file>`.

`mark(name)` appends one JSON line to that file when a phase of the run ends: the phase's name, the wall time,
the resident memory now (VmRSS) and the peak resident memory *since the previous mark* (VmHWM), then resets the
kernel's peak counter (`/proc/self/clear_refs`, value 5) so that the next phase's peak is its own. The peak is
exact (the kernel tracks it), with no sampling thread. Without the variable every call is a no-op costing one
dictionary lookup. `benchmarks/bench_real_size.py` reads the file.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

ENV = "PPDB_PHASE_LOG"


def memory_status() -> Dict[str, int]:
    """{"rss": bytes resident now, "peak": peak resident bytes since the last reset} of this process (Linux)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    return found


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mark(name: str, **extra) -> Optional[dict]:
    """End phase `name`: record its peak memory and the time, and start the next phase's peak from here."""
    path = os.environ.get(ENV)
    if not path:
        return None
    record = {"phase": name, "time": time.time(), **memory_status(), **extra}
    record["peak_reset"] = reset_peak()
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def read_marks(path: str) -> list:
    """The records a run wrote, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
