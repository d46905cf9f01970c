"""DreamBooth-LoRA entry point: `python -m ppdreambooth.train` with `--use_lora` on.

    python -m ppdreambooth.train_lora [config.json] [--flag value ...]

The seed README's `train_dreambooth_lora.py` command line runs unchanged with this module in place of
the script; `--lora_rank` (or `--rank`), `--lora_alpha` and every flag of full fine-tuning apply.
Without `--learning_rate` LoRA uses 1e-4 (the seed's rate) instead of 5e-6.
"""

if __name__ == "__main__" and not __package__:
    # Run as a file, as `python -m paddle.distributed.launch --gpus 0,1 <site-packages>/ppdreambooth/train_lora.py`
    # does (the seed's pattern): the relative imports below need the package, so run the package's module. The
    # file's own folder leaves sys.path (its module names would shadow others), the package's parent enters it.
    import os as _os
    import runpy as _runpy
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _runpy.run_module("ppdreambooth.train_lora", run_name="__main__", alter_sys=True)
    _sys.exit(0)

import sys
from typing import Optional, Sequence

from ppdreambooth import train
from ppdreambooth.runtime.exiting import exit_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv[:1] if argv and argv[0].endswith(".json") else []
    return train.main(config + ["--use_lora", "true"] + argv[len(config):])


def cli() -> None:
    exit_process(main())


if __name__ == "__main__":
    cli()
