"""The errors gkg-pyg raises for mistakes of its user (not for bugs).

Every one is a :class:`GkgError`, so a command line can tell them from bugs:
the scripts (``gkg_pyg.cli.run_cli``) print a user error as one line,
``error: <message>``, and exit with status 2, while any other exception
keeps its traceback. Each also derives from the builtin exception that code
written before these classes catches: ``ValueError`` for a wrong value,
``FileNotFoundError`` for a missing file, ``OSError`` for an image file that
cannot be decoded, ``FileExistsError`` for a run folder already in use.

The message alone must say what is wrong and, where there is one, what to
do instead: the user sees nothing else.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "GkgError", "ImageError", "InputSizeError", "MissingFileError",
    "RunExistsError", "UsageError",
]  # fmt: skip


class GkgError(Exception):
    """A mistake in what the user gave gkg-pyg: a config, data, a checkpoint, an image, an option."""


class ConfigError(GkgError, ValueError):
    """A config file, override or config value that does not fit the schema or its ranges."""


class UsageError(GkgError, ValueError):
    """A command-line argument (or a function argument taken from one) that cannot work."""


class DataError(GkgError, ValueError):
    """A data set whose files are malformed: a CSV row, an annotation file, a class list."""


class CheckpointError(GkgError, ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model."""


class InputSizeError(GkgError, ValueError):
    """An image tensor the model cannot take (wrong shape or dtype, smaller than the smallest input)."""


class MissingFileError(GkgError, FileNotFoundError):
    """A file or folder the user named (config, checkpoint, data set, image) that does not exist."""


class ImageError(GkgError, OSError):
    """An image file that exists but cannot be decoded (an ``OSError``, like PIL's own errors)."""


class RunExistsError(GkgError, FileExistsError):
    """A run folder that already holds a run, which a fresh run would overwrite."""
