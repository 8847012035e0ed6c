"""onnxshrink: post-export ONNX model compressor.

Python API, one function per command (README, "Python API"):

- `onnxshrink.optimize(path_or_model, output, ...)` returns an `OptimizeResult`;
- `onnxshrink.parity(reference, candidate, ...)` returns a `ParityReport`;
- `onnxshrink.benchmark(models, ...)` (the `bench` command; `onnxshrink.bench` is its module)
  returns a `BenchReport`.

Every error they raise is an `OnnxShrinkError`, exported here with its subclasses.
"""

from __future__ import annotations

from onnxshrink.bench import BenchReport, BenchRow, benchmark
from onnxshrink.engine.optimize import ModelSummary, OptimizeResult, optimize, rewrite_model
from onnxshrink.engine.passes import BrokenPassError
from onnxshrink.errors import (
    ModelLoadError,
    OnnxRuntimeMissingError,
    OnnxShrinkError,
    ParityError,
    TimeLimitError,
    UsageError,
)
from onnxshrink.verify.parity import OutputParity, ParityReport, parity

__version__ = "0.1.0"

__all__ = [
    "BenchReport",
    "BenchRow",
    "BrokenPassError",
    "ModelLoadError",
    "ModelSummary",
    "OnnxRuntimeMissingError",
    "OnnxShrinkError",
    "OptimizeResult",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "TimeLimitError",
    "UsageError",
    "benchmark",
    "optimize",
    "parity",
    "rewrite_model",
    "__version__",
]
