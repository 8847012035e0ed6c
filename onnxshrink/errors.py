"""Errors that the CLI turns into one clear line and an exit code.

Every class here is exported from `onnxshrink` and listed in the README ("Python API"), so that
a caller can catch exactly what the CLI reports; `tests/test_api.py` checks both.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from importlib import metadata

logger = logging.getLogger(__name__)

#: the command that installs ONNX Runtime for onnxshrink (README, "Installing")
INSTALL_ONNXRUNTIME = (
    "pip install 'onnxshrink[cpu]' (or 'onnxshrink[gpu]' for CUDA and TensorRT; "
    "from a clone: pip install '.[cpu]')"
)


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


class OnnxRuntimeMissingError(OnnxShrinkError):
    """No ONNX Runtime is installed: onnxshrink needs `onnxruntime` or `onnxruntime-gpu`.

    Neither is a base requirement (they install the same module; see pyproject.toml), so a
    plain `pip install onnxshrink` ends here, with the command that fixes it.
    """


def require_onnxruntime() -> None:
    """Raise OnnxRuntimeMissingError, naming the install command, when `onnxruntime` is absent.

    Also warns, once per process, when both the CPU and the GPU wheel are installed
    (`_warn_if_both_builds`).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        raise OnnxRuntimeMissingError(f"ONNX Runtime is not installed: {INSTALL_ONNXRUNTIME}")
    _warn_if_both_builds()


@functools.cache
def _warn_if_both_builds() -> None:
    # The two wheels overwrite each other's files in one `onnxruntime` folder, so which build
    # runs depends on the order they were installed in, and uninstalling one breaks the other.
    if len(installed_onnxruntime_builds()) > 1:
        logger.warning(
            "both onnxruntime and onnxruntime-gpu are installed; they share the `onnxruntime` "
            "module, so keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then "
            "pip install 'onnxshrink[cpu]' or 'onnxshrink[gpu]'"
        )


def installed_onnxruntime_builds() -> list[str]:
    """The ONNX Runtime distributions installed here, e.g. ["onnxruntime-gpu"]."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (ORT's are long), or its type when empty."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]
