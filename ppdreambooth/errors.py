"""The errors a user can act on. Entry points print them as one line (no traceback) and exit with status 2."""


class ConfigError(ValueError):
    """A configuration or input problem, named with the flag, file or folder and what to do."""


class ExportError(ValueError):
    """A run cannot be written in the format asked for (and why, and what to use instead)."""
