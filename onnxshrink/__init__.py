"""onnxshrink: post-export ONNX model compressor.

Python API: `onnxshrink.optimize(path_or_model, output, ...)` returns an `OptimizeResult`.
"""

from __future__ import annotations

from onnxshrink.engine.optimize import ModelSummary, OptimizeResult, optimize, rewrite_model
from onnxshrink.errors import OnnxShrinkError, ParityError, UsageError

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
