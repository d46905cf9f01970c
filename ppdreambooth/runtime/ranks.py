"""Data-parallel ranks that stop together.

- `agree_max` / `agree_sum` / `gather_floats`: small collectives with which every rank takes the same decision at the same
  step (stop on a signal, stop on a non-finite loss anywhere, refuse a locked output folder).
- `announce_failure` / `PeerWatch`: a rank that fails with an unexpected exception cannot join the collective
  its peers wait in, so it leaves a note `<output_dir>/.ppdreambooth-rank-<r>.failed` (rank, step, error) and
  lingers a moment; every other rank polls for such notes in a thread (which runs even while its main thread
  waits inside a collective) and, seeing one, says which rank failed and why, and exits at once.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import threading
import time
from typing import Callable, List, Optional

logger = logging.getLogger(__name__)

NOTE_PATTERN = ".ppdreambooth-rank-{rank}.failed"
PEER_FAILED_EXIT = 1
progress = {"step": None}  # the optimizer step in progress on this rank (set by the trainer), for failure notes


def agree_max(value: int) -> int:
    """The largest of every rank's `value` (all ranks must call it at the same point)."""
    import paddle
    import paddle.distributed as dist

    tensor = paddle.to_tensor([int(value)], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agree_sum(value: int) -> int:
    """The sum of every rank's `value` (all ranks must call it at the same point)."""
    import paddle
    import paddle.distributed as dist

    tensor = paddle.to_tensor([int(value)], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item())


def gather_floats(value) -> List[float]:
    """Every rank's scalar `value` (a tensor), in rank order."""
    import paddle
    import paddle.distributed as dist

    gathered: list = []
    dist.all_gather(gathered, paddle.reshape(value.detach().astype("float32"), [1]))
    return [float(v) for v in paddle.concat(gathered).numpy()]


def note_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, NOTE_PATTERN.format(rank=rank))


def clear_notes(output_dir: str) -> None:
    """Remove notes left by an earlier run (rank 0, holding the folder's lock, before the ranks start watching)."""
    for path in glob.glob(os.path.join(glob.escape(output_dir), NOTE_PATTERN.format(rank="*"))):
        try:
            os.remove(path)
        except OSError:
            pass


def read_note(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe_note(note: dict) -> str:
    where = f" at step {note['step']}" if note.get("step") is not None else ""
    return f"rank {note.get('rank')} failed{where}: {note.get('error')}"


def announce_failure(output_dir: str, rank: int, error: BaseException, status: int = PEER_FAILED_EXIT,
                     linger: float = 2.0) -> None:
    """Leave this rank's failure note (its error and exit status) for its peers, which exit with the same
    status, then give their watchers `linger` seconds to see it."""
    note = {"rank": rank, "step": progress["step"], "error": f"{type(error).__name__}: {error}"[:500],
            "status": status, "pid": os.getpid()}
    try:
        tmp = note_path(output_dir, rank) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(note, f)
        os.replace(tmp, note_path(output_dir, rank))
    except OSError as e:
        logger.warning("could not leave a failure note for the other ranks in %s: %s", output_dir, e)
        return
    print(f"ppdreambooth: error: {describe_note(note)}; stopping the other ranks too", file=sys.stderr, flush=True)
    time.sleep(linger)


def peer_failure(output_dir: str, rank: int, world_size: int) -> Optional[dict]:
    """The failure note of another rank, if one was left (one directory listing, however many ranks)."""
    try:
        names = set(os.listdir(output_dir))
    except OSError:
        return None
    for peer in range(world_size):
        name = NOTE_PATTERN.format(rank=peer)
        if peer != rank and name in names:
            note = read_note(os.path.join(output_dir, name))
            if note is not None:
                return note
    return None


class PeerWatch:
    """A daemon thread that ends this process when another rank leaves a failure note."""

    def __init__(self, output_dir: str, rank: int, world_size: int, before_exit: Callable[[], None] = lambda: None,
                 interval: float = 0.5):
        self.output_dir, self.rank, self.world_size = output_dir, rank, world_size
        self.before_exit, self.interval = before_exit, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ppdreambooth-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is ending by itself: watch no more."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            note = peer_failure(self.output_dir, self.rank, self.world_size)
            if note is not None and not self._stopped.is_set():
                sys.stderr.write(f"ppdreambooth: error: {describe_note(note)} (its log has the details); "
                                 f"stopping rank {self.rank} as well. Complete checkpoints are kept: resume with "
                                 "--resume_from_checkpoint latest once the cause is fixed.\n")
                sys.stderr.flush()
                try:
                    self.before_exit()
                finally:
                    status = note.get("status")
                    os._exit(status if isinstance(status, int) and 0 < status < 256 else PEER_FAILED_EXIT)
