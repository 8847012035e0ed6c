"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations


class OnnxShrinkError(Exception):
    """A failure the user can act on; `exit_code` is what the CLI returns (1 failure, 2 usage)."""

    exit_code = 1


class UsageError(OnnxShrinkError):
    """Bad arguments or input files: exit code 2."""

    exit_code = 2


class ModelLoadError(UsageError):
    """The input file is missing, unreadable, not ONNX, or an invalid model."""


class ParityError(OnnxShrinkError):
    """The rewritten model's outputs moved more than the tolerance allows."""


class TimeLimitError(OnnxShrinkError):
    """An ONNX Runtime run of a check took longer than its time limit (`--time-limit`)."""


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (ORT's are long), or its type when empty."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]
