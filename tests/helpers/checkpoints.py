"""Checkpoint look-ups the tests use (the package resolves `latest` through `training.preflight`)."""
import logging
from typing import Optional

from ppdreambooth.runtime.checkpoints import complete_checkpoints, newest_good_checkpoint

logger = logging.getLogger(__name__)


def latest_checkpoint(output_dir: str, verify: bool = True) -> Optional[str]:
    """The newest complete checkpoint; with `verify`, the newest that also matches its checksums (each damaged
    one skipped is logged by name)."""
    if not verify:
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    found, damaged = newest_good_checkpoint(output_dir)
    for check in damaged:
        logger.warning("%s: skipped", check.describe())
    return found.path if found else None
