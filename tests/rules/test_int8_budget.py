"""int8 placement within the error budget (rules/int8.py, with the engine's search and error
figure) on tiny models with one fragile layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.quant.calibration import collect_ranges
from onnxshrink.quant.sensitivity import output_error
from onnxshrink.rules.int8 import layer_sensitivity, quantize_with_budget
from onnxshrink.rules.qdq import activation_tensors
from tests.helpers import histogram, make_model, run

_THREE_MATMULS = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[4,32] x) => (float[4,32] y) {
    a = MatMul (x, w1)
    ra = Relu (a)
    b = MatMul (ra, w2)
    rb = Relu (b)
    y = MatMul (rb, w3)
}
"""


def _fragile_model() -> onnx.ModelProto:
    """w2 has a huge row that only meets zeros: per-channel int8 rounds the rest of w2 to 0.

    Column 0 of w1 is zero, so `ra[:, 0] == 0` and row 0 of w2 never changes the float output,
    but it sets every column's scale (`max|W_c| / 127`) far above the other weights.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
    w1[:, 0] = 0.0
    w2 = rng.normal(0, 0.2, (32, 32)).astype(np.float32)
    w2[0, :] = 1000.0
    w3 = rng.normal(0, 0.2, (32, 32)).astype(np.float32)
    return make_model(_THREE_MATMULS, {"w1": w1, "w2": w2, "w3": w3})


def _feeds(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (4, 32)).astype(np.float32)} for _ in range(n)]


def _ranges(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    return collect_ranges(model, activation_tensors(model, "ort-cpu"), _feeds(), "minmax")


def _node_names(model: onnx.ModelProto) -> dict[str, str]:
    """Output tensor -> node name, as quantize_qdq names unnamed nodes."""
    return {n.output[0]: n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)}


def _error_of(model: onnx.ModelProto, nodes: set[str]) -> float:
    """The budget's figure of `model` with only `nodes` quantized, on all of `_feeds()`."""
    from onnxshrink.quant.sensitivity import ErrorReference
    from onnxshrink.rules.qdq import quantize_qdq

    single, _ = quantize_qdq(model, _ranges(model), nodes=nodes, weight_only=False)
    return ErrorReference.from_model(model, _feeds(), 10**6).error(single, "nodes")


def test_output_error_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    ref = [[rng.normal(0, 1, (3, 5)), rng.normal(0, 10, 7)] for _ in range(3)]
    cand = [[r + rng.normal(0, 0.1, r.shape) for r in run_] for run_ in ref]
    # worst output; both outputs are one channel group (one scale), so their figure is pooled
    expected = max(
        [
            sum(np.sum((c[o] - r[o]) ** 2) for r, c in zip(ref, cand, strict=True))
            / sum(np.sum(r[o] ** 2) for r in ref)
            for o in range(2)
        ]
    )
    assert output_error(ref, cand) == pytest.approx(expected, rel=1e-12)
    assert output_error(ref, ref) == 0.0
    assert output_error(ref, cand, outputs=[1]) < output_error(ref, cand, outputs=[0])
    # scale-free: scaling both by 1000 keeps the figure
    big_ref = [[1000 * a for a in r] for r in ref]
    big_cand = [[1000 * a for a in c] for c in cand]
    assert output_error(big_ref, big_cand) == pytest.approx(output_error(ref, cand))
    assert output_error([[np.zeros(3)]], [[np.ones(3)]]) == float("inf")
    assert output_error([[np.zeros(3)]], [[np.zeros(4)]]) == float("inf")


def test_ranking_puts_the_fragile_layer_first() -> None:
    model = _fragile_model()
    names = _node_names(model)
    seen: list[tuple[int, int]] = []
    ranked = layer_sensitivity(
        model, _ranges(model), _feeds(), progress=lambda i, n: seen.append((i, n))
    )
    assert [e.op for e in ranked] == ["MatMul"] * 3
    assert ranked[0].name == names["b"]
    assert ranked[0].error > 10 * ranked[1].error
    assert [e.error for e in ranked] == sorted((e.error for e in ranked), reverse=True)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_ranking_error_is_the_numpy_figure() -> None:
    model = _fragile_model()
    ranges = _ranges(model)
    feeds = _feeds(4)
    ranked = layer_sensitivity(model, ranges, feeds, samples=4)
    from onnxshrink.rules.qdq import quantize_qdq

    top = ranked[0]
    single, _ = quantize_qdq(model, ranges, nodes={top.name})
    ref = np.concatenate([run(model, f)[0] for f in feeds])
    got = np.concatenate([run(single, f)[0] for f in feeds])
    expected = np.sum((got.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2)
    assert top.error == pytest.approx(expected, rel=1e-6)


def test_tight_budget_keeps_the_fragile_layer_float() -> None:
    model = _fragile_model()
    names = _node_names(model)
    # above the error of a and y quantized together, as the search measures it (every
    # sample): the figure depends on the CPU's int8 kernels (AVX2's u8s8 products saturate)
    budget = 1.5 * _error_of(model, {names["a"], names["y"]})
    qmodel, report = quantize_with_budget(model, _ranges(model), _feeds(), max_error=budget)
    assert report.full_error > budget
    assert report.within_budget and report.final_error <= budget
    assert list(report.kept_float) == [names["b"]]
    assert report.quantize is not None
    assert names["b"] in report.quantize.kept_float
    assert "sensitive" in report.quantize.kept_float[names["b"]]
    assert sorted(report.quantize.quantized) == sorted([names["a"], names["y"]])
    assert histogram(qmodel)["MatMul"] == 3
    onnx.checker.check_model(qmodel, full_check=True)
    # k = 0 fails, the gallop's first probe k = 1 passes; then one more session tries int8
    # storage for the kept weight, which fails here: the weight itself is the fragile part
    assert [k for k, _ in report.steps] == [0, 1, 1]
    assert report.steps[2][1] > budget and report.kept_weights_int8 == []
    assert report.quantize.weight_only == []
    # re-measure the returned model independently, as ORT runs it: optimized, so that its
    # Q/DQ pairs become int8 kernels, whose error depends on the CPU (`run` keeps them float)
    from onnxshrink.verify.parity import ort_session

    feeds = _feeds()
    ref = [run(model, f) for f in feeds]
    session = ort_session(qmodel)
    got = [session.run(None, f) for f in feeds]
    assert output_error(ref, got) == pytest.approx(report.final_error, rel=1e-6)


def test_loose_budget_quantizes_everything_without_ranking() -> None:
    model = _fragile_model()
    qmodel, report = quantize_with_budget(model, _ranges(model), _feeds(), max_error=1.0)
    assert report.kept_float == {} and report.ranking == []
    assert report.sessions == 1 and report.final_error == report.full_error
    feeds = _feeds()
    ref = [run(model, f) for f in feeds]
    assert (
        0.0
        < report.full_error
        == pytest.approx(output_error(ref, [run(qmodel, f) for f in feeds]), rel=1e-6)
    )
    assert report.quantize is not None
    assert len(report.quantize.quantized) == 3
    assert histogram(qmodel)["DequantizeLinear"] > 0


def test_zero_budget_keeps_everything_float() -> None:
    model = _fragile_model()
    qmodel, report = quantize_with_budget(model, _ranges(model), _feeds(), max_error=0.0)
    assert report.final_error == 0.0 and len(report.kept_float) == 3
    assert report.quantize is not None
    assert report.quantize.quantized == []
    assert histogram(qmodel)["QuantizeLinear"] == 0


def test_exclude_and_precomputed_ranking() -> None:
    model = _fragile_model()
    names = _node_names(model)
    ranges = _ranges(model)
    ranked = layer_sensitivity(model, ranges, _feeds(), exclude=[names["a"]])
    assert {e.name for e in ranked} == {names["b"], names["y"]}
    budget = 1.5 * _error_of(model, {names["y"]})  # y quantized alone passes, b does not
    _, report = quantize_with_budget(
        model, ranges, _feeds(), max_error=budget, exclude=[names["a"]], ranking=ranked
    )
    assert report.sessions <= 3  # no ranking sessions
    assert report.quantize is not None
    assert names["a"] not in report.quantize.quantized
    assert list(report.kept_float) == [names["b"]]


def test_bad_input() -> None:
    model = _fragile_model()
    with pytest.raises(UsageError, match="max-error"):
        quantize_with_budget(model, _ranges(model), _feeds(), max_error=-1.0)
    with pytest.raises(UsageError, match="at least one"):
        layer_sensitivity(model, _ranges(model), [])
    with pytest.raises(UsageError, match="lacks model input"):
        layer_sensitivity(model, _ranges(model), [{"z": np.zeros(3, np.float32)}])
