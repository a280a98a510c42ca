"""What every command-line script shares: one line per user error, and the
library's log messages printed the way the scripts print.

A script is written as ``run(argv)``, which does the work and raises, and

    def main(argv=None) -> int:
        return run_cli(run, argv)

``run_cli`` turns a :class:`gkg_pyg.errors.GkgError` (a mistake in the
config, the data, a checkpoint, an image or an option) into the line
``error: <message>`` on stderr and exit status 2, argparse's status for a
usage error; ``--debug`` adds the traceback. Any other exception is a bug
and keeps its traceback (exit status 1).

:class:`ArgumentParser` is argparse's parser with ``--debug`` and with its
own errors (an unknown option, a value of the wrong type, ``parser.error``)
raised as :class:`~gkg_pyg.errors.UsageError`, so that they take the same
one-line path.

:func:`setup_logging` makes the ``gkg_pyg`` logger (the library reports
what a checkpoint load used and skipped, what a data set left out, which
thresholds fell back) print plain messages: INFO to stdout, warnings to
stderr as ``warning: <message>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .errors import GkgError, UsageError

__all__ = [
    "ArgumentParser",
    "add_compile_backend_argument",
    "check_compile_backend",
    "compiled",
    "device_argument",
    "one_line",
    "prepare_output",
    "run_cli",
    "setup_logging",
]

LOGGER = "gkg_pyg"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``--debug``, whose errors raise
    :class:`UsageError` instead of printing the usage and exiting."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_compile_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile-backend NAME``: the ``torch.compile`` backend of ``--compile``
    (default inductor; ``eager`` / ``aot_eager`` trace without generating code, to debug)."""
    parser.add_argument("--compile-backend", default="inductor", metavar="NAME",
                        help="torch.compile backend for --compile (default inductor)")  # fmt: skip


def device_argument(value: str):
    """``--device``'s type: a ``torch.device`` that this machine has (``cpu``,
    ``cuda``, ``cuda:1``, ``mps``), else an ``argparse.ArgumentTypeError`` naming it
    (one ``error:`` line, not a traceback from the first tensor moved there)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value!r}: use cpu, cuda, cuda:N or mps")
    return device


def prepare_output(path, option: str, folder: bool = False) -> Path:
    """``path``, checked before any work: for an output ``folder`` the folder,
    otherwise the file's parent folder, created if missing and written to once
    (a file probed and removed where it did not exist), so that a long run does
    not end in a traceback when it saves.  A :class:`UsageError` naming
    ``option`` for a file or folder in the way, or a place that cannot be written."""
    path = Path(path)
    where = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give the file to write")
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = path if not folder else where / f".gkg-pyg-write-check-{os.getpid()}"
        existed = probe.exists()
        with open(probe, "ab"):
            pass
        if not existed:
            probe.unlink()
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
    return path


def compiled(module, args: argparse.Namespace):
    """``torch.compile(module, backend=args.compile_backend)`` when ``args.compile``, else the module.
    An unknown backend is a UsageError naming the known ones."""
    if not getattr(args, "compile", False):
        return module
    import torch

    check_compile_backend(args.compile_backend)
    return torch.compile(module, backend=args.compile_backend)


def check_compile_backend(name: str) -> None:
    """A UsageError naming the known ``torch.compile`` backends when ``name`` is not one of them."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise UsageError(f"--compile-backend {name!r} is not a torch.compile backend; known: {known}")


class _ConsoleHandler(logging.Handler):
    """Plain messages: below WARNING to stdout, WARNING and above to stderr
    with the level as a prefix. The stream is looked up for every record, so
    that a redirected ``sys.stdout`` (pytest's capture, a notebook) gets it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, message = sys.stderr, f"{record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's convention: report, never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Print the ``gkg_pyg`` logger's records at ``level`` and above (one
    handler however often it is called); returns the logger."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    return logger


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An exception re-raised from a
    DataLoader worker carries the worker's whole traceback in its message:
    its last line (without the exception's type) is the message."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and name.rpartition(".")[2] == type(err).__name__ else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run_cli(run: Callable[[list[str]], object], argv: Sequence[object] | None = None) -> int:
    """Run ``run(argv)`` as a command: logging set up, a user error as one
    line on stderr. Returns the exit status: ``run``'s own when it returns an
    int, else 0; 2 after a user error."""
    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    setup_logging()
    try:
        status = run(args)
    except GkgError as err:
        if "--debug" in args:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
