"""DreamBooth-LoRA entry point: `python -m ppdreambooth.train` with `--use_lora` on.

    python -m ppdreambooth.train_lora [config.json] [--flag value ...]

The seed README's `train_dreambooth_lora.py` command line runs unchanged with this module in place of
the script; `--lora_rank` (or `--rank`), `--lora_alpha` and every flag of full fine-tuning apply.
Without `--learning_rate` LoRA uses 1e-4 (the seed's rate) instead of 5e-6.
"""
import sys
from typing import Optional, Sequence

from . import train


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv[:1] if argv and argv[0].endswith(".json") else []
    return train.main(config + ["--use_lora", "true"] + argv[len(config):])


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
