"""The Python API (README, "Python API") and the install contract (README, "Installing").

- `optimize`, `parity` and `benchmark` take paths or ModelProtos and return report objects;
- every error class is exported from `onnxshrink` and named in the README, and every error the
  README names is exported;
- the README's Python example runs;
- without ONNX Runtime the CLI and the API stop with one line naming the install command;
- pyproject.toml's base requirements hold no ONNX Runtime build, its `cpu` and `gpu` extras one
  each, and the Makefile installs the `cpu` one.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import onnxshrink
import onnxshrink.errors
from onnxshrink.cli import app
from tests.helpers import make_model

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_CONV_BN = """
<ir_version: 8, opset_import: ["" : 13]>
net (float[N,3,H,W] x) => (float[N,4,H,W] y) {
    c = Conv <pads = [1,1,1,1]> (x, w, b)
    n = BatchNormalization (c, gamma, beta, mean, var)
    y = Relu (n)
}
"""


def conv_bn_model(shift: float = 0.0) -> onnx.ModelProto:
    """Conv + BatchNorm + Relu on a dynamic [N,3,H,W] input `x` (optimize folds the BN);
    `shift` moves the BN's bias, so a shifted model is a candidate that fails parity."""
    rng = np.random.default_rng(0)
    return make_model(
        _CONV_BN,
        {
            "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
            "b": rng.normal(0, 0.1, 4).astype(np.float32),
            "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
            "beta": (rng.normal(0, 0.1, 4) + shift).astype(np.float32),
            "mean": rng.normal(0, 0.1, 4).astype(np.float32),
            "var": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        },
    )


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


# --- parity and benchmark from Python ------------------------------------------------------


def test_parity_takes_paths_or_protos_and_returns_a_report(tmp_path):
    ref = conv_bn_model()
    path = tmp_path / "ref.onnx"
    onnx.save_model(ref, str(path))
    by_path = onnxshrink.parity(path, str(path), samples=2)
    by_proto = onnxshrink.parity(ref, ref, samples=2, input_shapes={"x": [2, 3, 8, 8]})
    for report in (by_path, by_proto):
        assert isinstance(report, onnxshrink.ParityReport)
        assert report.verified and report.passed and report.samples == 2
        assert [o.name for o in report.outputs] == ["y"]
        assert report.outputs[0].max_abs == 0.0 and report.localization is None
    assert by_proto.rows == 4  # two runs of batch 2


def test_parity_reports_a_failure_without_raising_and_localizes_it():
    ref, cand = conv_bn_model(), conv_bn_model(shift=0.5)
    report = onnxshrink.parity(ref, cand, samples=2, localize=None)
    assert report.verified and not report.passed and not report.outputs[0].ok
    assert report.localization is not None and report.localization.nodes
    # a per-output override turns the failure into a pass; no localization unless asked
    loose = onnxshrink.parity(ref, cand, samples=2, tolerances={"y": {"atol": 10.0}})
    assert loose.passed and loose.localization is None


def test_parity_on_a_list_of_feeds():
    ref = conv_bn_model()
    feeds = [{"x": np.full((1, 3, 4, 4), v, np.float32)} for v in (0.0, 0.5, 1.0)]
    report = onnxshrink.parity(ref, ref, feeds)
    assert report.passed and report.samples == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"samples": 2, "inputs": [{"x": np.zeros((1, 3, 4, 4), np.float32)}]}, "--samples"),
        ({"input_shapes": {"nope": [1, 3, 4, 4]}}, "nope is not a model input"),
        ({"input_ranges": {"x": (1.0, 0.0)}}, "LOW must be below HIGH"),
        ({"tolerances": {"y": {"rtoll": 1.0}}}, "unknown key(s) rtoll"),
        ({"tolerances": {"z": {"rtol": 1.0}}}, "not an output of the reference model"),
        ({"error_stat": "p99"}, "bad error statistic"),
    ],
)
def test_parity_refuses_bad_settings_with_usage_error(kwargs, message):
    ref = conv_bn_model()
    inputs = kwargs.pop("inputs", None)
    with pytest.raises(onnxshrink.UsageError) as caught:
        onnxshrink.parity(ref, ref, inputs, **kwargs)
    assert message in str(caught.value)


def test_missing_model_is_model_load_error_everywhere(tmp_path):
    missing = tmp_path / "missing.onnx"
    calls = [
        lambda: onnxshrink.optimize(missing),
        lambda: onnxshrink.parity(conv_bn_model(), missing),
        lambda: onnxshrink.benchmark([missing]),
    ]
    for call in calls:
        with pytest.raises(onnxshrink.ModelLoadError, match="no such file") as caught:
            call()
        assert isinstance(caught.value, onnxshrink.UsageError)
        assert caught.value.exit_code == 2


def test_benchmark_takes_paths_and_protos(tmp_path):
    ref = conv_bn_model()
    path = tmp_path / "ref.onnx"
    onnx.save_model(ref, str(path))
    report = onnxshrink.benchmark([path, ref], input_shapes={"x": [1, 3, 16, 16]}, warmup=1, runs=3)
    assert isinstance(report, onnxshrink.BenchReport)
    assert [r.model for r in report.rows] == [str(path), "model 2"]
    assert all(r.provider == "cpu" and r.runs == 3 for r in report.rows)
    single = onnxshrink.benchmark(ref, warmup=0, runs=1)  # one model, not a sequence
    assert [r.model for r in single.rows] == ["model 1"]


# --- errors: exported and documented -------------------------------------------------------


def _error_classes() -> list[type[BaseException]]:
    """Every exception class defined in onnxshrink.errors, and BrokenPassError (optimize's)."""
    from onnxshrink.engine.passes import BrokenPassError

    defined = [
        cls
        for _, cls in inspect.getmembers(onnxshrink.errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == onnxshrink.errors.__name__
    ]
    return [*defined, BrokenPassError]


def test_every_error_class_is_exported_and_documented():
    section = _readme_section("Python API")
    classes = _error_classes()
    assert {c.__name__ for c in classes} >= {"ModelLoadError", "UsageError", "ParityError"}
    for cls in classes:
        assert cls.__name__ in onnxshrink.__all__, cls.__name__
        assert getattr(onnxshrink, cls.__name__) is cls
        assert issubclass(cls, onnxshrink.OnnxShrinkError)
        assert f"`{cls.__name__}`" in section, f"{cls.__name__} is not in the README"


def test_every_error_the_readme_names_is_exported():
    named = set(re.findall(r"\b([A-Z]\w*Error)\b", _readme_section("Python API")))
    assert "ModelLoadError" in named
    for name in named:
        assert name in onnxshrink.__all__, f"the README names {name}, which is not exported"


def test_exports_resolve():
    for name in onnxshrink.__all__:
        assert hasattr(onnxshrink, name), name
    # `bench` stays the module; the function is `benchmark`
    from onnxshrink import bench

    assert inspect.ismodule(bench) and bench.benchmark is onnxshrink.benchmark


# --- the README example runs ---------------------------------------------------------------


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _readme_section("Python API"), re.S)
    assert blocks, "no ```python block in the README's Python API section"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    onnx.save_model(conv_bn_model(), "model.onnx")
    code = _python_example()
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert Path("model.opt.onnx").exists()
    assert printed[0].endswith("True") and "->" in printed[0]  # nodes before -> after, parity
    assert printed[1].startswith("True [('y', ")
    assert sum("cpu p50" in line for line in printed) == 2
    assert printed[-1] == "missing.onnx: no such file"


# --- without ONNX Runtime ------------------------------------------------------------------


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """As if no ONNX Runtime were installed: `import onnxruntime` fails, find_spec finds none."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


def test_cli_without_onnxruntime_names_the_install_command(tmp_path, no_onnxruntime):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(), str(path))
    runner = CliRunner()
    for argv in (["optimize", str(path)], ["parity", str(path), str(path)], ["bench", str(path)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == [
            "error: ONNX Runtime is not installed: pip install 'onnxshrink[cpu]' (or "
            "'onnxshrink[gpu]' for CUDA and TensorRT; from a clone: pip install '.[cpu]')"
        ]
    assert runner.invoke(app, ["rules"]).exit_code == 0  # lists rules without running models
    assert runner.invoke(app, ["optimize", "--help"]).exit_code == 0


def test_api_without_onnxruntime_raises_one_error(no_onnxruntime):
    model = conv_bn_model()
    for call in (
        lambda: onnxshrink.optimize(model),
        lambda: onnxshrink.parity(model, model),
        lambda: onnxshrink.benchmark([model]),
    ):
        with pytest.raises(onnxshrink.OnnxRuntimeMissingError, match=r"onnxshrink\[cpu\]"):
            call()


def test_both_builds_installed_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(
        onnxshrink.errors,
        "installed_onnxruntime_builds",
        lambda: ["onnxruntime", "onnxruntime-gpu"],
    )
    onnxshrink.errors._warn_if_both_builds.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="onnxshrink.errors"):
            onnxshrink.errors.require_onnxruntime()
            onnxshrink.errors.require_onnxruntime()
    finally:
        onnxshrink.errors._warn_if_both_builds.cache_clear()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "pip uninstall -y onnxruntime onnxruntime-gpu" in warnings[0]


# --- packaging -----------------------------------------------------------------------------


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_onnxruntime_comes_from_exactly_one_extra():
    project = _pyproject()["project"]
    builds = {"onnxruntime", "onnxruntime-gpu"}
    assert not builds & {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert [_requirement_name(r) for r in extras["cpu"]] == ["onnxruntime"]
    assert [_requirement_name(r) for r in extras["gpu"]] == ["onnxruntime-gpu"]
    for name, requirements in extras.items():
        if name not in ("cpu", "gpu"):
            assert not builds & {_requirement_name(r) for r in requirements}, name


def test_makefile_installs_the_cpu_extra():
    installs = [
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "pip install" in line and "-e" in line
    ]
    assert installs and all("[cpu" in line for line in installs), installs


def test_rules_layout_installs_as_onnxshrink_rules():
    # rules/ is the real folder, onnxshrink/rules links to it, and package-dir maps the root,
    # so a wheel holds onnxshrink/rules/*.py and `pip install -e .` is a plain .pth entry.
    link = ROOT / "onnxshrink" / "rules"
    assert link.is_symlink() and link.resolve() == (ROOT / "rules").resolve()
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"": "."}
    assert "onnxshrink.rules" in setuptools["packages"]
