"""Script form of `python -m ppdreambooth.train`, for `python -m paddle.distributed.launch` (which runs files)."""
from ppdreambooth.train import cli

if __name__ == "__main__":
    cli()
