"""Graph helpers: constants, readers, rewiring that keeps graph-output names."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import (
    const_value,
    detach,
    is_default_domain,
    is_op,
    make_constant,
    only_consumer,
    replace_all_uses,
    sole_reader,
    unique_name,
)
from tests.helpers import make_model, run

_TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3] x) => (float[2,3] y) {
    a = Relu (x)
    y = Identity (a)
}
"""


def _graph() -> gs.Graph:
    model = make_model(_TEXT, constant_nodes={"k": np.ones((2, 3), np.float32)})
    for node in model.graph.node:
        node.ClearField("domain")  # as exporters write them: no domain field at all
    return gs.import_onnx(model)


def test_const_value_reads_constant_nodes_and_initializers():
    graph = _graph()
    tensors = graph.tensors()
    np.testing.assert_array_equal(const_value(tensors["k"]), np.ones((2, 3), np.float32))
    assert const_value(tensors["x"]) is None and const_value(None) is None


def test_default_domain_includes_missing_domain_field():
    graph = _graph()
    relu = next(n for n in graph.nodes if n.op == "Relu")
    assert relu.domain is None  # what gs gives for a node proto without a domain
    assert is_default_domain(relu) and is_op(relu, "Relu") and not is_op(relu, "Add")
    relu.domain = "com.example"
    assert not is_op(relu, "Relu")


def test_replace_all_uses_keeps_graph_output_name():
    graph = _graph()
    identity = next(n for n in graph.nodes if n.op == "Identity")
    y = identity.outputs[0]
    a = identity.inputs[0]
    detach(identity)
    replace_all_uses(graph, y, a)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["y"]
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})[0], np.maximum(x, 0))


def test_readers_and_unique_names():
    graph = _graph()
    tensors = graph.tensors()
    relu = next(n for n in graph.nodes if n.op == "Relu")
    assert only_consumer(graph, tensors["x"], relu)
    assert sole_reader(graph, tensors["x"]) is relu
    assert not only_consumer(graph, tensors["y"], relu)  # a graph output
    assert unique_name(graph, "a") == "a_1"
    assert unique_name(graph, "a") == "a_2"
    assert unique_name(graph, "fresh") == "fresh"


def test_make_constant_keeps_a_scalar_a_scalar():
    """np.ascontiguousarray gives a 0-d array one dim; a rule's scalar must stay rank 0 (a
    [1] constant changes broadcast ranks, and Range's shape inference refuses it)."""
    graph = _graph()
    scalar = make_constant(graph, "s", np.array(3, np.int64))
    assert scalar.values.shape == () and int(scalar.values) == 3
    column = make_constant(graph, "c", np.ones((4, 2), np.float32)[:, :1])  # not contiguous
    assert column.values.shape == (4, 1) and column.values.flags.c_contiguous
