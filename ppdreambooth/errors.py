"""The errors a user can act on. Entry points print them as one line (no traceback) and exit with status 2."""


class ConfigError(ValueError):
    """A configuration or input problem, named with the flag, file or folder and what to do."""


class ExportError(ValueError):
    """A run cannot be written in the format asked for (and why, and what to use instead)."""


class SaveError(RuntimeError):
    """A checkpoint or the final model could not be written (full disk, read-only folder, no permission); the
    message says what is intact and how to continue. Entry points exit with status 1."""
