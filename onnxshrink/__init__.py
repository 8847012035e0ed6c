"""onnxshrink: post-export ONNX model compressor.

Python API: `onnxshrink.optimize(path_or_model, output, ...)` returns an `OptimizeResult`.
"""

from __future__ import annotations

from onnxshrink.errors import OnnxShrinkError, ParityError, UsageError
from onnxshrink.optimize import ModelSummary, OptimizeResult, optimize, rewrite_model

__version__ = "0.1.0"

__all__ = [
    "ModelSummary",
    "OnnxShrinkError",
    "OptimizeResult",
    "ParityError",
    "UsageError",
    "optimize",
    "rewrite_model",
    "__version__",
]
