"""The optimize pipeline: parity gate, input untouched, interface kept, custom ops passed through."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

import onnxshrink
from onnxshrink.engine.passes import FunctionPass
from onnxshrink.errors import ParityError, UsageError
from tests.helpers import histogram, make_model, scale_weights


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_verified_smaller_model(tmp_path, conv_bn_path):
    before = _sha(conv_bn_path)
    out = tmp_path / "out.onnx"
    result = onnxshrink.optimize(conv_bn_path, out)
    assert _sha(conv_bn_path) == before
    assert result.output_path == out and out.exists()
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert result.parity.verified and result.parity.passed
    assert result.after.nodes < result.before.nodes
    assert "Constant" not in histogram(model)


def test_optimize_keeps_metadata_and_interface(conv_bn_model):
    entry = conv_bn_model.metadata_props.add()
    entry.key, entry.value = "character", "a\nb"
    conv_bn_model.producer_name = "exporter"
    result = onnxshrink.optimize(conv_bn_model)
    assert {p.key: p.value for p in result.model.metadata_props} == {"character": "a\nb"}
    assert result.model.producer_name == "exporter"
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert result.output_path is None


def _break_weights(graph, ctx):
    """A deliberately wrong 'rule': scales every float initializer."""
    import onnx_graphsurgeon as gs

    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32:
            tensor.values = tensor.values * np.float32(1.1)
    return False


def test_parity_failure_writes_nothing(tmp_path, conv_bn_path):
    from onnxshrink.rules import lossless_passes

    out = tmp_path / "out.onnx"
    passes = [*lossless_passes(), FunctionPass("break", _break_weights)]
    with pytest.raises(ParityError, match="differs from the original"):
        onnxshrink.optimize(conv_bn_path, out, passes=passes)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx"]


def test_refuses_to_overwrite_input(conv_bn_path):
    with pytest.raises(UsageError, match="overwrite the input"):
        onnxshrink.optimize(conv_bn_path, conv_bn_path)


def test_custom_domain_op_passes_through_unverified(tmp_path):
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13, "com.example" : 1]>
        agraph (float[2,3] x) => (float[2,3] y) {
            a = Identity (x)
            b = com.example.Mystery (a)
            y = Relu (b)
        }
        """
    )
    # by default an unverifiable result is not written (issue 9, 10): exit 0 means verified
    with pytest.raises(ParityError, match="could not be verified.*--allow-unverified"):
        onnxshrink.optimize(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    result = onnxshrink.optimize(model, tmp_path / "out.onnx", allow_unverified=True)
    ops = [(n.domain, n.op_type) for n in result.model.graph.node]
    assert ("com.example", "Mystery") in ops
    assert not result.parity.verified
    assert "not verified" in result.notes[0] and "--allow-unverified" in result.notes[0]
    assert (tmp_path / "out.onnx").exists()


def test_input_shape_pins_dims(tmp_path):
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[N, 4] x) => (float[N, 4] y) {
            y = Relu (x)
        }
        """
    )
    result = onnxshrink.optimize(model, input_shapes={"x": [3, 4]})
    dims = [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 4]
    with pytest.raises(UsageError, match="not a model input"):
        onnxshrink.optimize(model, input_shapes={"z": [3, 4]})
    with pytest.raises(UsageError, match="rank"):
        onnxshrink.optimize(model, input_shapes={"x": [3]})


def test_user_inputs_are_used(tmp_path, conv_bn_path):
    np.savez(tmp_path / "in.npz", x=np.full((1, 3, 8, 8), 0.5, np.float32))
    result = onnxshrink.optimize(conv_bn_path, inputs=tmp_path / "in.npz")
    assert result.parity.samples == 1 and result.parity.passed


def test_parity_counts_samples_and_runs_apart(tmp_path):
    """An .npz of 24 samples for a dynamic-batch model runs in batches of 8: the parity report
    says 24 samples in 3 runs, not "3 input sample(s)"."""
    rng = np.random.default_rng(0)
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[N,16] x) => (float[N,8] y) {
            y = Gemm (x, w, b)
        }
        """,
        {
            "w": rng.normal(size=(16, 8)).astype(np.float32),
            "b": rng.normal(size=(8,)).astype(np.float32),
        },
    )
    np.savez(tmp_path / "in.npz", x=rng.normal(size=(24, 16)).astype(np.float32))
    result = onnxshrink.optimize(model, inputs=tmp_path / "in.npz", calibration_batch=8)
    assert result.parity.samples == 3 and result.parity.rows == 24
    from onnxshrink.verify.parity import samples_text

    assert samples_text(3, 24) == "24 input sample(s) in 3 run(s)"
    assert samples_text(2, 2) == "2 input sample(s)"


# ORT fuses Conv+Mul itself (so both sides round alike); it has no Gemm+Mul fusion.
_GEMM_MUL = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,16] x) => (float[2,8] y) {
    c = Gemm (x, w, b)
    y = Mul (c, s)
}
"""


def _gemm_mul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return make_model(
        _GEMM_MUL,
        {
            "w": rng.normal(size=(16, 8)).astype(np.float32),
            "b": rng.normal(size=(8,)).astype(np.float32),
            "s": rng.uniform(0.1, 3.0, size=(8,)).astype(np.float32),
        },
    )


def test_scale_folds_are_dropped_when_rounding_breaks_parity():
    model = _gemm_mul_model()
    folded = onnxshrink.optimize(model)
    assert histogram(folded.model) == {"Gemm": 1}
    assert not folded.notes
    # A bar tighter than float32 rounding: the folded weights cannot meet it, the unfolded can.
    exact = onnxshrink.optimize(model, rtol=0.0, atol=0.0)
    assert histogram(exact.model) == {"Gemm": 1, "Mul": 1}
    assert exact.parity.passed and exact.parity.outputs[0].max_abs == 0.0
    assert "turned off" in exact.notes[0] and "moved" in exact.notes[0]


def test_input_with_default_stays_an_overridable_input():
    rng = np.random.default_rng(3)
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[1,2,4,4] x, float[3,2,1,1] w) => (float[1,3,4,4] y) {
            c = Conv (x, w)
            i = Identity (c)
            y = Mul (i, s)
        }
        """,
        {
            "w": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
            "s": np.full((1, 3, 1, 1), 2.0, np.float32),
        },
    )
    out = onnxshrink.optimize(model).model
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert {t.name for t in out.graph.initializer} == {"w", "s"}
    # Identity went; the Mul stays, since folding it would bake the default w into new weights.
    assert histogram(out) == {"Conv": 1, "Mul": 1}
    from tests.helpers import run

    x = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    w = rng.normal(size=(3, 2, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(
        run(out, {"x": x, "w": w})[0], run(model, {"x": x, "w": w})[0], rtol=1e-6
    )


def test_ir3_model_comes_out_as_ir4():
    """Found by bench/fuzz.py: IR 3 required every initializer to be an input too, so every
    rewritten IR 3 model was invalid (an internal error). Its initializers are constants."""
    rng = np.random.default_rng(4)
    model = make_model(
        """
        <ir_version: 3, opset_import: ["" : 8]>
        agraph (float[1,3,8,8] x, float[4,3,3,3] w, float[4] b) => (float[1,4,8,8] y) {
            c = Conv <pads = [1,1,1,1]> (x, w, b)
            i = Identity (c)
            y = Relu (i)
        }
        """,
        {
            "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
        },
    )
    result = onnxshrink.optimize(model)
    out = result.model
    assert out.ir_version == 4 and any("IR version 3 raised to 4" in n for n in result.notes)
    assert histogram(out) == {"Conv": 1, "Relu": 1}
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"]
    assert result.parity is not None and result.parity.passed


def test_input_that_is_also_an_output_keeps_its_input_type():
    """Found by bench/fuzz.py: an int64 input also listed as an output declared float took the
    output's type on the way out, so ORT could not load the result (the Equal reading it)."""
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (int64[1] sr, float[2] x) => (float[2] y) {
            c = Constant <value = int64[1] {16000}> ()
            e = Equal (sr, c)
            n = Neg (x)
            i = Identity (n)
            y = Where (e, x, i)
        }
        """
    )
    model.graph.output.append(onnx.helper.make_tensor_value_info("sr", onnx.TensorProto.FLOAT, [1]))
    result = onnxshrink.optimize(model)
    assert result.parity is not None and result.parity.passed
    out = result.model
    assert histogram(out) == {"Equal": 1, "Neg": 1, "Where": 1}
    onnx.checker.check_model(out)
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert out.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int4_weights_survive_the_rewrite():
    """Found by bench/fuzz.py: gs exports int4 values one byte per element once a rule has read
    them, which onnx refuses; every int4 model was an internal error."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        agraph (float[2,4] x) => (float[2,4] y) {
            d = DequantizeLinear (w, s)
            i = Identity (d)
            k = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
            e = Exp (k)
            m = Mul (i, e)
            y = Add (x, m)
        }
        """
    )
    values = np.array([[1, 2, 3, -4], [5, 6, 7, -8]])
    model.graph.initializer.extend(
        [
            onnx.helper.make_tensor("w", onnx.TensorProto.INT4, [2, 4], values.reshape(-1)),
            onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.5]),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    result = onnxshrink.optimize(model)
    out = result.model
    assert result.parity is not None and result.parity.passed
    assert histogram(out) == {"DequantizeLinear": 1, "Mul": 1, "Add": 1}
    onnx.checker.check_model(out, full_check=True)
    weight = next(t for t in out.graph.initializer if t.name == "w")
    assert weight.data_type == onnx.TensorProto.INT4
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weight).astype(int), values)


def test_empty_list_attribute_survives_the_rewrite():
    """Found by bench/fuzz.py: gs cannot export an empty INTS attribute (`axes=[]`), so such a
    model was an internal error; it comes out with the attribute as it was."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2,4] x) => (float[2,4] y) {
            i = Identity (x)
            m = ReduceMean (i)
            y = Sub (x, m)
        }
        """
    )
    model.graph.node[1].attribute.append(
        onnx.AttributeProto(name="axes", type=onnx.AttributeProto.INTS)
    )
    onnx.checker.check_model(model, full_check=True)
    result = onnxshrink.optimize(model)
    out = result.model
    assert result.parity is not None and result.parity.passed
    assert histogram(out) == {"ReduceMean": 1, "Sub": 1}
    onnx.checker.check_model(out, full_check=True)
    (axes,) = next(n for n in out.graph.node if n.op_type == "ReduceMean").attribute
    assert (axes.name, axes.type, list(axes.ints)) == ("axes", onnx.AttributeProto.INTS, [])


# ---------------------------------------------------------------------------------------------
# debug_verify: the checker and parity after every pass that changed the graph


def _wrong_weight_shape(graph, ctx) -> bool:
    """A pass that gives the Conv a weight of the wrong input channels (checker: fine)."""
    import onnx_graphsurgeon as gs

    for node in graph.nodes:
        if node.op == "Conv":
            node.inputs[1] = gs.Constant("w_bad", np.ones((4, 5, 3, 3), np.float32))
            return True
    return False


def _unknown_op(graph, ctx) -> bool:
    """A pass that leaves an op no opset defines (onnx.checker rejects the model)."""
    for node in graph.nodes:
        if node.op == "Conv":
            node.op = "Konv"
            return True
    return False


@pytest.mark.parametrize(
    "name, fn, kind, what",
    [
        ("scale-weights", scale_weights, "parity", "outputs moved past the tolerance"),
        ("unknown-op", _unknown_op, "checker", "onnx.checker: "),
        ("wrong-shape", _wrong_weight_shape, "parity", "the post-pass model fails where"),
    ],
)
def test_debug_verify_names_the_pass_that_broke_the_model(
    tmp_path, conv_bn_path, name, fn, kind, what
):
    from onnxshrink.engine.passes import BrokenPassError
    from onnxshrink.rules import lossless_passes

    out = tmp_path / "out.onnx"
    passes = [*lossless_passes(), FunctionPass(name, fn)]
    with pytest.raises(BrokenPassError) as caught:
        onnxshrink.optimize(conv_bn_path, out, passes=passes, debug_verify=True)
    message = str(caught.value)
    assert message.startswith(f"pass '{name}' (sweep 1) broke the model: {what}")
    assert f"applied in it: {name} x1" in message
    assert message.endswith(
        "passes before it: ..., cleanup, constant-folding, fusion, cse, "
        "dedup-initializers; nothing written"
    )
    assert caught.value.pass_name == name and caught.value.kind == kind
    assert not out.exists()


def test_debug_verify_passes_a_good_pipeline_and_checks_each_changing_pass(
    tmp_path, conv_bn_path, monkeypatch
):
    from onnxshrink.engine import optimize as engine

    checked = []
    original_call = engine.StepVerifier.__call__

    def spy(self, graph, pass_name):
        checked.append(pass_name)
        original_call(self, graph, pass_name)

    monkeypatch.setattr(engine.StepVerifier, "__call__", spy)
    plain = onnxshrink.optimize(conv_bn_path)
    result = onnxshrink.optimize(conv_bn_path, tmp_path / "out.onnx", debug_verify=True)
    assert result.parity.passed and (tmp_path / "out.onnx").exists()
    assert histogram(result.model) == histogram(plain.model) == {"Conv": 1}
    # Constant node -> initializer, Identity removed (cleanup), BN folded (fusion).
    assert {"constants-to-initializers", "cleanup", "fusion"} <= set(checked)
    assert "shape-inference" not in checked  # it never reports a change


def test_debug_verify_parity_failure_from_weight_rescaling_retries_like_the_final_check():
    # With a zero tolerance the Gemm+Mul fold's rounding fails the per-pass check: the engine
    # retries without output-side scale folds, as it does when the final check fails.
    result = onnxshrink.optimize(_gemm_mul_model(), rtol=0.0, atol=0.0, debug_verify=True)
    assert histogram(result.model) == {"Gemm": 1, "Mul": 1}
    assert result.parity.passed
    assert "turned off" in result.notes[0] and "pass 'fusion': outputs moved" in result.notes[0]


def test_debug_verify_without_a_runnable_model_checks_with_the_checker_only():
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13, "com.example" : 1]>
        agraph (float[2,3] x) => (float[2,3] y) {
            a = Identity (x)
            b = com.example.Mystery (a)
            y = Relu (b)
        }
        """
    )
    result = onnxshrink.optimize(model, debug_verify=True, allow_unverified=True)
    assert ("com.example", "Mystery") in [(n.domain, n.op_type) for n in result.model.graph.node]
    assert any(
        n.startswith("--debug-verify checked each pass with onnx.checker only")
        for n in result.notes
    )


def _unloadable_shift(graph, ctx):
    """A deliberately bad 'rule': a channel shift of the wrong width after a Conv, which
    ORT's shape inference rejects when it loads the model while onnx.checker (no shape
    inference) accepts it, as in the issue's depthwise case."""
    import onnx_graphsurgeon as gs

    if any(name.endswith("_bad_shift") for name in graph.tensors()):
        return False  # once per graph
    for node in graph.nodes:
        if node.op == "Conv":
            out = node.outputs[0]
            channels = node.inputs[1].values.shape[0]
            bad = np.zeros((1, channels + 1, 1, 1), np.float32)
            shift = gs.Constant(f"{out.name}_bad_shift", bad)
            moved = gs.Variable(f"{out.name}_before_shift", dtype=out.dtype)
            node.outputs[0] = moved
            graph.nodes.append(gs.Node("Add", inputs=[moved, shift], outputs=[out]))
            graph.toposort()
            return True
    return False


def test_result_that_ort_cannot_load_is_a_failed_rewrite(tmp_path, conv_bn_path):
    """Issue 9, 2: never write a result less loadable than its input."""
    from onnxshrink.rules import lossless_passes

    out = tmp_path / "out.onnx"
    passes = [*lossless_passes(), FunctionPass("bad-shift", _unloadable_shift)]
    with pytest.raises(ParityError, match="cannot be loaded by ONNX Runtime.*nothing written"):
        onnxshrink.optimize(conv_bn_path, out, passes=passes)
    assert not out.exists()


def test_inputs_that_do_not_fit_the_model_are_bad_input(tmp_path, conv_bn_path):
    """Issue 9, 3: wrong dtype, rank or dims, and an empty file, are exit-2 errors."""
    import onnx as onnx_module

    x = onnx_module.load(str(conv_bn_path)).graph.input[0]
    dims = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    cases = {
        "dtype": np.zeros(dims, np.float64),
        "rank": np.zeros(dims[1:], np.float32),
        "dims": np.zeros([*dims[:-1], dims[-1] + 5], np.float32),
        "empty": np.zeros([0, *dims[1:]], np.float32),
    }
    for name, array in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{x.name: array})
        out = tmp_path / f"{name}.onnx"
        with pytest.raises(UsageError, match=r"--inputs .*(fails on the inputs|0 samples)"):
            onnxshrink.optimize(conv_bn_path, out, inputs=path)
        assert not out.exists(), name


def test_optional_values_and_type_attributes_survive_the_rewrite():
    """onnx-graphsurgeon can neither export an optional-typed value (it fails on the element
    TypeProto it keeps as the dtype) nor import a TypeProto attribute (the `type` of an empty
    Optional, without which the node is invalid): both are kept around it (the test_if_opt
    node test)."""
    text = """<ir_version: 8, opset_import: ["" : 16]>
g (bool cond, float[3] x) => (optional(seq(float[3])) out, float[3] y) {
    y = Neg(x)
    out = If(cond) <
        then_branch = t () => (optional(seq(float[3])) empty) {
            empty = Optional<type = seq(float[3])>()
        },
        else_branch = e () => (optional(seq(float[3])) full) {
            s = SequenceConstruct(y)
            full = Optional(s)
        }
    >
}"""
    before = onnx.parser.parse_model(text)
    feeds = [{"cond": np.array(c), "x": np.ones(3, np.float32)} for c in (True, False)]
    result = onnxshrink.optimize(before, inputs=feeds)
    after = result.model
    onnx.checker.check_model(after, full_check=True)
    assert result.parity.verified and result.parity.passed
    assert histogram(after, recurse=True) == histogram(before, recurse=True)
    if_node = after.graph.node[-1]
    else_branch, then_branch = (a.g for a in sorted(if_node.attribute, key=lambda a: a.name))
    assert after.graph.output[0].type == before.graph.output[0].type
    assert else_branch.output[0].type == before.graph.output[0].type
    empty = next(n for n in then_branch.node if n.op_type == "Optional")
    assert [a.type for a in empty.attribute] == [onnx.AttributeProto.TYPE_PROTO]
