"""One run per output folder: `--output_dir` is locked for the duration of a run.

The lock is `<output_dir>/.ppdreambooth.lock`, held with `flock(2)`: the kernel drops it when the holding
process ends in any way (exit, exception, SIGKILL, a crash; after a power loss nothing holds it), so a lock
left behind by a run that died never blocks the next run. The file also names its holder (pid, host, start
time, command line) for the message a refused run prints; on a filesystem without working `flock` a holder
that is still alive on this host is recognised from that record (pid and process start time).

Under data parallel only rank 0 takes the lock, for the whole run; `preflight.check_inputs` then tells the
other ranks whether it got it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".ppdreambooth.lock"
_held: Dict[str, "OutputDirLock"] = {}  # real path of the folder -> this process's lock (re-entrant)


SECRET = re.compile(r"token|key|secret|password", re.IGNORECASE)


class OutputDirBusy(Exception):
    """Another live run holds the output folder."""


def redacted(argv: List[str]) -> List[str]:
    """The command line without the values of flags like --hub_token or --wandb_api_key (the record is readable
    by every user of the machine, and goes into another run's message)."""
    out, hide = [], False
    for arg in argv:
        if hide and not arg.startswith("--"):
            out.append("***")
        elif arg.startswith("--") and "=" in arg and SECRET.search(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
        hide = arg.startswith("--") and "=" not in arg and bool(SECRET.search(arg))
    return out


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): tells a live holder
    from an unrelated process that reused its pid. None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: dict) -> bool:
    """Whether the recorded holder is a process still running on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _process_start(pid)
    return start is None or holder.get("start_ticks") in (None, start)


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "a run that is just starting"
    text = f"process {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    if holder.get("ranks", 1) > 1:
        text += f" (rank 0 of {holder['ranks']} data-parallel ranks; their launcher is process {holder.get('parent')})"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text


def read_holder(output_dir: str) -> dict:
    try:
        with open(os.path.join(output_dir, LOCK_NAME), encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


class OutputDirLock:
    def __init__(self, output_dir: str, fd: int, path: str):
        self.output_dir, self.fd, self.path, self.count = output_dir, fd, path, 1
        self.created_folder = False  # the lock made the folder: a run that stops on bad input removes it again

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        if self.created_folder:
            try:
                os.rmdir(self.output_dir)  # only when nothing else was written there
            except OSError:
                pass


def acquire(output_dir: str, ranks: int = 1) -> OutputDirLock:
    """Lock `output_dir` for this process (creating the folder), or raise OutputDirBusy naming the holder.

    Re-entrant within one process: each `acquire` needs a matching `release`."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key].count += 1
        return _held[key]
    path = os.path.join(output_dir, LOCK_NAME)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(_busy_message(output_dir, read_holder(output_dir))) from None
        except OSError as e:  # no flock on this filesystem: rely on the holder record alone
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            logger.warning("%s does not support file locks: a second run is recognised only on this host", output_dir)
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the holder removed it as it finished: try again on the new file
            same_file = False
        if not same_file:
            os.close(fd)
            continue
        previous = read_holder(output_dir)
        if previous.get("pid") and previous.get("pid") != os.getpid() and _alive_here(previous):
            os.close(fd)  # the lock was granted but its recorded holder lives: the filesystem's locks do not work
            raise OutputDirBusy(_busy_message(output_dir, previous))
        if previous.get("pid"):
            logger.warning("taking over the lock on %s left by %s, which is no longer running", output_dir,
                           describe_holder(previous))
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(redacted([sys.executable, *sys.argv])),
            "ranks": ranks, "parent": os.getppid(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        lock = _held[key] = OutputDirLock(output_dir, fd, path)
        lock.created_folder = created
        return lock
    raise OutputDirBusy(f"--output_dir {output_dir}: could not lock {path} (it keeps being replaced)")


def release(output_dir: str) -> None:
    """Undo one `acquire` of this process; the last one removes the lock."""
    key = os.path.realpath(output_dir)
    lock = _held.get(key)
    if lock is None:
        return
    lock.count -= 1
    if lock.count <= 0:
        del _held[key]
        lock.release()


def release_all() -> None:
    """Drop every lock this process holds (before an immediate exit)."""
    for key in list(_held):
        _held.pop(key).release()


def _busy_message(output_dir: str, holder: dict) -> str:
    stop = holder.get("parent") if holder.get("ranks", 1) > 1 else holder.get("pid")
    hint = f" Wait for it to finish, stop it (kill -TERM {stop}: it writes a checkpoint first)," if stop else " Wait,"
    return (f"--output_dir {output_dir} is in use by another run: {describe_holder(holder)}.{hint} or choose "
            "another --output_dir.")
