"""Tests for rules/quantize_gather.py: embedding tables stored int8 per row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.rules.quantize_gather import (
    plan_gather_tables,
    quantize_gather_tables,
    quantize_rows,
)
from tests.helpers import assert_unchanged, histogram, make_model, run

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'

EMBEDDING = f"""{HEADER}
g (int64[2,3] ids) => (float[2,3,8] y) {{
    y = Gather (table, ids)
}}
"""


def _table(rows: int = 5000, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rows of very different magnitudes: a per-row scale matters
    return (rng.normal(size=(rows, dim)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)


def _ids(seed: int, rows: int = 5000, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-rows, rows, size=shape).astype(np.int64)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _assert_parity(
    before: onnx.ModelProto, after: onnx.ModelProto, table: np.ndarray, name: str = "ids"
) -> None:
    """Within the int8 rounding: half the largest row scale (plus float32 rounding)."""
    _, scale = quantize_rows(table)
    atol = float(scale.max()) / 2 * (1 + 1e-5)
    for seed in range(3):
        feeds = {name: _ids(seed, table.shape[0])}  # negative indices included
        for ref, got in zip(run(before, feeds), run(after, feeds), strict=True):
            np.testing.assert_allclose(got, ref, rtol=0, atol=atol)


# --- positive cases ------------------------------------------------------------------------


def test_embedding_table_becomes_int8_rows():
    table = _table()
    model = make_model(EMBEDDING, {"table": table})
    after, report = quantize_gather_tables(model)
    assert report.quantized == ["Gather_0"]  # unnamed: named as onnxshrink.rules.qdq does
    assert report.declined == {}
    assert histogram(after) == {"Gather": 2, "Cast": 1, "Mul": 1}
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == ["y"]
    assert [i.name for i in after.graph.input] == ["ids"]
    assert after.graph.node[-1].op_type == "Mul" and after.graph.node[-1].output[0] == "y"
    _assert_parity(model, after, table)
    # storage: the int8 table is a quarter of the float one, plus 4 bytes of scale per row
    inits = {t.name: t for t in after.graph.initializer}
    assert set(inits) == {"table_int8", "table_row_scale"}
    assert inits["table_int8"].data_type == onnx.TensorProto.INT8
    assert _init(after, "table_int8").nbytes * 4 == table.nbytes
    assert list(inits["table_row_scale"].dims) == [5000, 1]
    assert report.bytes_before == table.nbytes
    assert report.bytes_after == table.nbytes // 4 + 5000 * 4
    assert after.ByteSize() < 0.4 * model.ByteSize()
    assert model.graph.node[0].input[0] == "table"  # the input model is kept


def test_rounding_per_row():
    table = _table(rows=600, dim=16)
    table[7] = 0.0  # a row of zeros: scale 1, exact
    q, scale = quantize_rows(table)
    assert scale[7, 0] == 1.0 and not q[7].any()
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.all(np.abs(table - q * scale) <= scale / 2 * (1 + 1e-6))
    text = f"""{HEADER}
    g (int64[4] ids) => (float[4,16] y) {{
        y = Gather (table, ids)
    }}
    """
    model = make_model(text, {"table": table})
    after, report = quantize_gather_tables(model)
    assert len(report.quantized) == 1
    assert histogram(after) == {"Gather": 2, "Cast": 1, "Mul": 1}
    onnx.checker.check_model(after, full_check=True)
    (got,) = run(after, {"ids": np.array([7, 0, -1, 599], np.int64)})
    assert not got[0].any()
    np.testing.assert_allclose(got, (q * scale)[[7, 0, -1, 599]], rtol=1e-6, atol=0)


def test_output_with_other_readers_and_names_taken():
    # the Gather output is a graph output and also read by a Relu; new names avoid clashes
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float[2,3,8] y, float[2,3,8] r, float[2,3,8] table_int8) {{
        y = Gather (table, ids)
        r = Relu (y)
        table_int8 = Neg (y)
    }}
    """
    table = _table()
    model = make_model(text, {"table": table})
    model.graph.node[0].name = "lookup"
    after, report = quantize_gather_tables(model)
    assert report.quantized == ["lookup"]
    assert histogram(after) == {"Gather": 2, "Cast": 1, "Mul": 1, "Relu": 1, "Neg": 1}
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == ["y", "r", "table_int8"]
    assert after.graph.node[0].name == "lookup"
    assert after.graph.node[0].input[0] == "table_int8_1"
    names = [n.name for n in after.graph.node]
    assert len(set(names)) == len(names)
    _assert_parity(model, after, table)


def test_two_tables_and_a_small_one():
    # token and position embeddings of a BERT-like encoder; a tiny type table stays float
    text = f"""{HEADER}
    g (int64[2,3] ids, int64[2,3] pos, int64[2,3] typ) => (float[2,3,8] y) {{
        a = Gather (tokens, ids)
        b = Gather (positions, pos)
        c = Gather (types, typ)
        s = Add (a, b)
        y = Add (s, c)
    }}
    """
    tokens, positions = _table(5000, 8, 1), _table(500, 8, 2)
    types = _table(2, 8, 3)
    model = make_model(text, {"tokens": tokens, "positions": positions, "types": types})
    after, report = quantize_gather_tables(model, min_elements=4096)
    assert report.quantized == ["Gather_0"]
    assert report.declined == {
        "Gather_1": "table has 4000 elements < min_elements 4096",
        "Gather_2": "table has 16 elements < min_elements 4096",
    }
    assert histogram(after) == {"Gather": 4, "Cast": 1, "Mul": 1, "Add": 2}
    onnx.checker.check_model(after, full_check=True)
    after2, report2 = quantize_gather_tables(model, min_elements=4000)
    assert report2.quantized == ["Gather_0", "Gather_1"]
    assert histogram(after2) == {"Gather": 5, "Cast": 2, "Mul": 2, "Add": 2}
    onnx.checker.check_model(after2, full_check=True)
    _, s_tok = quantize_rows(tokens)
    _, s_pos = quantize_rows(positions)
    atol = (float(s_tok.max()) + float(s_pos.max())) / 2 * (1 + 1e-5)
    feeds = {"ids": _ids(0, 5000), "pos": _ids(1, 500), "typ": _ids(2, 2)}
    for ref, got in zip(run(model, feeds), run(after2, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    # the plan alone (onnxshrink inspect): the same report, the model untouched
    before = model.SerializeToString()
    for min_elements, done in ((4096, report), (4000, report2)):
        plan = plan_gather_tables(model, min_elements=min_elements)
        assert (plan.quantized, plan.declined) == (done.quantized, done.declined)
        assert (plan.bytes_before, plan.bytes_after) == (done.bytes_before, done.bytes_after)
        assert plan.bytes_after > 0
    assert model.SerializeToString() == before


# --- negative cases ------------------------------------------------------------------------


def _assert_declined(model: onnx.ModelProto, node: str, reason: str, **kwargs) -> None:
    after, report = quantize_gather_tables(model, **kwargs)
    assert report.quantized == []
    assert reason in report.declined[node], report.declined
    assert report.bytes_before == report.bytes_after == 0
    assert_unchanged(model, after)


def test_table_read_twice():
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float[2,3,8] y, float[8] s) {{
        y = Gather (table, ids)
        s = ReduceSum <keepdims = 0> (table, axes)
    }}
    """
    model = make_model(text, {"table": _table(), "axes": np.array([0], np.int64)})
    _assert_declined(model, "Gather_0", "shared")


def test_table_read_by_two_gathers():
    text = f"""{HEADER}
    g (int64[2,3] ids, int64[2,3] other) => (float[2,3,8] y, float[2,3,8] z) {{
        y = Gather (table, ids)
        z = Gather (table, other)
    }}
    """
    model = make_model(text, {"table": _table()})
    after, report = quantize_gather_tables(model)
    assert report.quantized == []
    assert set(report.declined) == {"Gather_0", "Gather_1"}
    assert_unchanged(model, after)


def test_table_read_inside_subgraph():
    text = f"""{HEADER}
    g (bool c, int64[2,3] ids) => (float[2,3,8] y, float[5000,8] z) {{
        y = Gather (table, ids)
        z = If (c) <
            then_branch = t () => (float[5000,8] a) {{ a = Neg (table) }},
            else_branch = e () => (float[5000,8] b) {{ b = Identity (table) }}
        >
    }}
    """
    model = make_model(text, {"table": _table()})
    _assert_declined(model, "Gather_0", "shared")


def test_small_table():
    model = make_model(EMBEDDING, {"table": _table(rows=100)})
    _assert_declined(model, "Gather_0", "800 elements < min_elements 4096")


def test_axis_1():
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float[5000,2,3] y) {{
        y = Gather <axis = 1> (table, ids)
    }}
    """
    model = make_model(text, {"table": _table()})
    _assert_declined(model, "Gather_0", "axis 1")


def test_table_is_graph_input():
    # an initializer that is also a graph input may be overridden by the caller
    text = f"""{HEADER}
    g (int64[2,3] ids, float[5000,8] table) => (float[2,3,8] y) {{
        y = Gather (table, ids)
    }}
    """
    model = make_model(text, {"table": _table()})
    _assert_declined(model, "Gather_0", "graph input")


def test_table_not_constant():
    text = f"""{HEADER}
    g (int64[2,3] ids, float[5000,8] x) => (float[2,3,8] y) {{
        t = Relu (x)
        y = Gather (t, ids)
    }}
    """
    model = make_model(text)
    _assert_declined(model, "Gather_1", "not a constant initializer")


def test_table_3d():
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float[2,3,50,10] y) {{
        y = Gather (table, ids)
    }}
    """
    model = make_model(text, {"table": _table(5000, 8).reshape(80, 50, 10)})
    _assert_declined(model, "Gather_0", "3-D")


def test_table_float16():
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float16[2,3,8] y) {{
        y = Gather (table, ids)
    }}
    """
    model = make_model(text, {"table": _table().astype(np.float16)})
    _assert_declined(model, "Gather_0", "float16, not float32")


@pytest.mark.parametrize(("exclude", "node"), [(["look"], "lookup"), (["Gather"], "lookup")])
def test_excluded(exclude: list[str], node: str):
    text = f"""{HEADER}
    g (int64[2,3] ids) => (float[2,3,8] y) {{
        y = Gather (table, ids)
    }}
    """
    model = make_model(text, {"table": _table()})
    model.graph.node[0].name = "lookup"
    _assert_declined(model, node, "excluded by", exclude=exclude)
    with pytest.raises(UsageError, match="regex"):
        quantize_gather_tables(model, exclude=["("])


def test_gather_inside_subgraph():
    text = f"""{HEADER}
    g (bool c, int64[2,3] ids) => (float[2,3,8] y) {{
        y = If (c) <
            then_branch = t () => (float[2,3,8] a) {{ a = Gather (table, ids) }},
            else_branch = e () => (float[2,3,8] b) {{ b = Gather (table, ids) }}
        >
    }}
    """
    model = make_model(text, {"table": _table()})
    after, report = quantize_gather_tables(model)
    assert report.quantized == []
    assert len(report.declined) == 2
    assert all("subgraph" in reason for reason in report.declined.values())
    assert histogram(after, recurse=True) == histogram(model, recurse=True)
    assert_unchanged(model, after)
