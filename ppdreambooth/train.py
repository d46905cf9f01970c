"""DreamBooth fine-tuning entry point.

    python -m ppdreambooth.train [config.json] [--flag value ...]
    bash run_train.sh [config.json] [--flag value ...]        # also launches several GPUs

The seed README's `train_dreambooth.py` command lines run unchanged with either. Order of work:
parse and check every input (no model is loaded before that) -> class images -> model -> dataset ->
`DreamBoothTrainer.train()` -> the final pipeline folder in `--output_dir` (`ppdreambooth.training.run`).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # Run as a file, as `python -m paddle.distributed.launch --gpus 0,1 <site-packages>/ppdreambooth/train.py`
    # does (the seed's pattern): the relative imports below need the package, so run the package's module. The
    # file's own folder leaves sys.path (its module names would shadow others), the package's parent enters it.
    import os as _os
    import runpy as _runpy
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _runpy.run_module("ppdreambooth.train", run_name="__main__", alter_sys=True)
    _sys.exit(0)

import sys
from typing import Optional, Sequence

from ppdreambooth.config.parsing import parse_args
from ppdreambooth.errors import ConfigError, SaveError
from ppdreambooth.runtime.exiting import exit_process
from ppdreambooth.runtime.nonfinite import NonFiniteLossError
from ppdreambooth.runtime.signals import TrainingInterrupted, graceful_stop
from ppdreambooth.training.run import run  # noqa: F401  (the API: ppdreambooth.train.run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 done, 1 a checkpoint or the final model could not be written (the message says what is
    intact), 2 an input error (nothing loaded), 3 a NaN/Inf loss, 128 + N stopped by signal N (130 Ctrl-C/SIGINT,
    143 SIGTERM) after writing a checkpoint."""
    with graceful_stop():
        try:
            run(*parse_args(argv))
        except ConfigError as e:
            print(f"ppdreambooth: error: {e}", file=sys.stderr)
            return 2
        except NonFiniteLossError as e:
            print(f"ppdreambooth: error: {e}", file=sys.stderr)
            return 3
        except SaveError as e:
            print(f"ppdreambooth: error: {e}", file=sys.stderr)
            return 1
        except TrainingInterrupted as e:
            print(f"ppdreambooth: {e}", file=sys.stderr, flush=True)
            return e.exit_status
    return 0


def cli() -> None:
    """Console-script entry point (`ppdreambooth-train`)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
