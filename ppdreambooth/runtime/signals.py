"""SIGTERM and SIGINT (pre-emption, Ctrl-C): finish the step, write a checkpoint, exit 128 + signal number.

While a run is in progress (`graceful_stop()`), the first SIGTERM or SIGINT
- before training starts (checks, class images, model loading): stops the run at once (nothing to save);
- during training: is recorded; the trainer finishes the step in progress, writes a complete checkpoint at
  that step (all data-parallel ranks agree on the step) and raises `TrainingInterrupted`;
- after the last step: lets the final model be written, then stops before exports and uploads.
A second signal more than `REPEAT_WINDOW` seconds after the first exits at once (status 128 + signal): nothing
already complete is lost, as every write is marked complete, or renamed into place, only when whole. Signals
closer together count as one: `paddle.distributed.launch` forwards one SIGTERM (or a terminal's Ctrl-C, which
reaches only the launcher) to each rank as up to three SIGTERMs in 0.4 s. Forked children that inherit the
handlers (DataLoader workers, which a terminal's Ctrl-C or a scheduler signalling the process group also
reaches) ignore the signals: the run stops them when it ends.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator, List, Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW = 1.0
SETUP, TRAINING, FINISHING, ENDING = "setup", "training", "finishing", "ending"  # ENDING: already on its way out


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(BaseException):
    """The run stopped on a signal; `checkpoint` is the complete checkpoint written for it (or None).

    A BaseException, like KeyboardInterrupt: a library's `except Exception` must not swallow it."""

    def __init__(self, signum: int, step: Optional[int] = None, max_steps: Optional[int] = None,
                 checkpoint: Optional[str] = None, final_model: Optional[str] = None):
        self.signum, self.step, self.max_steps = signum, step, max_steps
        self.checkpoint, self.final_model = checkpoint, final_model
        name = signal_name(signum)
        if final_model:
            text = (f"stopped by {name} after the final model was written to {final_model} (it is complete); the "
                    "steps after it (--export_formats, --push_to_hub) were skipped.")
        elif checkpoint:
            of = f" of {max_steps}" if max_steps else ""
            text = (f"stopped by {name} after step {step}{of}; checkpoint written to {checkpoint}. Run the same "
                    "command with --resume_from_checkpoint latest to continue.")
        else:
            text = f"stopped by {name} before training began; nothing was written."
        super().__init__(text)

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


def _say(text: str) -> None:
    try:
        os.write(2, f"ppdreambooth: {text}\n".encode())  # not print(): a handler may interrupt a print in progress
    except OSError:
        pass


class GracefulStop:
    """The signal handlers of one run; `signum` is the first signal received (None: keep going)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.phase = SETUP
        self.before_exit: List[Callable[[], None]] = []  # run before an immediate exit (release the lock)
        self._first_at = 0.0
        self._previous = {}
        self._pid = os.getpid()

    def install(self) -> None:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def enter(self, phase: str) -> None:
        self.phase = phase

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked child (a DataLoader worker) that inherited the handler: the run decides, not it
        now = time.monotonic()
        if self.signum is not None:
            if now - self._first_at < REPEAT_WINDOW:
                return  # the same request, delivered again
            self.exit_now(signum)
        self.signum, self._first_at = signum, now
        name = signal_name(signum)
        if self.phase == SETUP:
            raise TrainingInterrupted(signum)
        if self.phase == ENDING:
            return
        if self.phase == TRAINING:
            _say(f"{name} received: finishing the step in progress, then writing a checkpoint "
                 f"(signal again to stop at once, without it)")
        else:
            _say(f"{name} received: finishing the final model first (signal again to stop at once)")

    def exit_now(self, signum: int) -> None:
        _say(f"{signal_name(signum)} again: stopping at once; every checkpoint marked complete is kept")
        for callback in self.before_exit:
            try:
                callback()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        os._exit(exit_status(signum))


_current: Optional[GracefulStop] = None


def current() -> Optional[GracefulStop]:
    """The handlers of the run in progress in this process, if any."""
    return _current


@contextlib.contextmanager
def graceful_stop() -> Iterator[Optional[GracefulStop]]:
    """Handle SIGTERM/SIGINT for the duration of the block (re-entrant; only the main thread can install
    handlers, elsewhere this yields None and signals keep their usual effect)."""
    global _current
    if _current is not None:
        yield _current
        return
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop = GracefulStop()
    stop.install()
    _current = stop
    try:
        yield stop
    finally:
        _current = None
        stop.restore()
