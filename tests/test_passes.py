"""The pass manager reaches a fixed point, reports modification honestly, names failing passes;
rules hand check's plan to rewrite and count each declined match once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs
import pytest

from onnxshrink.engine.graph import detach, is_op, only_consumer, producer_of, replace_all_uses
from onnxshrink.engine.optimize import rewrite_model
from onnxshrink.engine.passes import (
    BrokenPassError,
    Decline,
    FunctionPass,
    PassCheckFailed,
    PassError,
    PassManager,
    PassStats,
    Rule,
    RuleContext,
    RulePass,
)
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.rules import lossless_passes
from onnxshrink.rules.dead_code import remove_dead_code
from onnxshrink.rules.noop_elimination import RULES as NOOP_RULES
from tests.helpers import apply, histogram, make_model

_CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3] x) => (float[2,3] y) {
    a = Identity (x)
    b = Identity (a)
    c = Relu (b)
    y = Identity (c)
}
"""


def _ctx(graph: gs.Graph) -> RuleContext:
    return RuleContext(graph, graph, 13, PassStats())


def test_rule_pass_reaches_fixed_point_and_keeps_output_name():
    model = make_model(_CHAIN)
    out, stats = apply(model, RulePass("noop", NOOP_RULES))
    assert histogram(out) == {"Relu": 1}
    assert [o.name for o in out.graph.output] == ["y"]
    assert stats.applied


def test_unmodified_graph_reports_false():
    import onnx

    graph = gs.import_onnx(make_model(_CHAIN))
    calls = []

    def noop(g, ctx):
        calls.append(1)
        return False

    result = PassManager([FunctionPass("noop", noop)], max_steps=5)(graph, _ctx(graph))
    assert result.modified is False
    assert len(calls) == 1  # a sweep that changes nothing ends the loop
    assert isinstance(gs.export_onnx(result.graph), onnx.ModelProto)


def test_manager_stops_at_step_limit():
    graph = gs.import_onnx(make_model(_CHAIN))
    calls = []

    def always(g, ctx):
        calls.append(1)
        return True

    PassManager([FunctionPass("always", always)], max_steps=3)(graph, _ctx(graph))
    assert len(calls) == 3


def test_failing_pass_is_named_with_its_predecessors():
    graph = gs.import_onnx(make_model(_CHAIN))

    def boom(g, ctx):
        raise ValueError("bad rewrite")

    manager = PassManager([FunctionPass("first", lambda g, c: False), FunctionPass("boom", boom)])
    with pytest.raises(
        PassError, match=r"pass 'boom' failed \(ValueError: bad rewrite\); passes before it: first"
    ):
        manager(graph, _ctx(graph))


def test_check_between_runs_after_changing_passes_and_names_the_broken_one():
    graph = gs.import_onnx(make_model(_CHAIN))
    seen: list[str] = []

    def check(g: gs.Graph, name: str) -> None:
        seen.append(name)
        if name == "breaks":
            raise PassCheckFailed("outputs moved", kind="parity")

    manager = PassManager(
        [
            FunctionPass("idle", lambda g, c: False),
            FunctionPass("changes", lambda g, c: True),
            FunctionPass("breaks", lambda g, c: True),
        ],
        check_between=check,
    )
    with pytest.raises(BrokenPassError) as caught:
        manager(graph, _ctx(graph))
    assert seen == ["changes", "breaks"]  # never after a pass that changed nothing
    assert str(caught.value) == (
        "pass 'breaks' (sweep 1) broke the model: outputs moved; applied in it: breaks x1; "
        "passes before it: idle, changes"
    )
    assert (caught.value.pass_name, caught.value.kind) == ("breaks", "parity")
    assert isinstance(caught.value, OnnxShrinkError)  # the CLI prints one line, exit 1


def test_default_pipeline_names_are_unique():
    names = [p.name for p in lossless_passes()]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------------------------------------
# The rule contract: check hands its plan to rewrite; declines count once per match site.

_DOUBLE_NEG = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3] x) => (float[2,3] y) {
    a = Neg (x)
    b = Neg (a)
    y = Relu (b)
}
"""


@dataclass
class _NegPair:
    outer: gs.Node
    inner: gs.Node


@dataclass
class _NegPairPlan:
    outer: gs.Node
    source: gs.Tensor  # what the readers of the outer Neg read instead


class _CancelDoubleNeg(Rule[_NegPair, _NegPairPlan]):
    """Neg(Neg(x)) -> x, recording every plan check hands out and every plan rewrite gets."""

    name = "cancel-double-neg"
    op_types = ("Neg",)

    def __init__(self) -> None:
        # test bookkeeping only: real rules keep no state on the instance
        self.checked: list[_NegPairPlan | Decline] = []
        self.rewritten: list[_NegPairPlan] = []

    def match(self, node: gs.Node, ctx: RuleContext) -> _NegPair | None:
        inner = producer_of(node.inputs[0])
        return _NegPair(node, inner) if is_op(inner, "Neg") else None

    def check(self, match: _NegPair, ctx: RuleContext) -> _NegPairPlan | Decline:
        verdict: _NegPairPlan | Decline = (
            _NegPairPlan(match.outer, match.inner.inputs[0])
            if only_consumer(ctx.graph, match.inner.outputs[0], match.outer)
            else Decline("inner Neg has other readers")
        )
        self.checked.append(verdict)
        return verdict

    def rewrite(self, plan: _NegPairPlan, ctx: RuleContext) -> None:
        self.rewritten.append(plan)
        out = plan.outer.outputs[0]
        detach(plan.outer)
        replace_all_uses(ctx.graph, out, plan.source)


if TYPE_CHECKING:
    # Static half of the contract, checked by mypy (`make lint`), never run: each line is an
    # error mypy must report, and warn_unused_ignores fails the lint if it stops reporting it.

    class _MisusesItsPlan(_CancelDoubleNeg):
        def check(self, match: _NegPair, ctx: RuleContext) -> _NegPairPlan | Decline:
            return match  # type: ignore[return-value]  # a match is not the plan

        def rewrite(self, plan: _NegPairPlan, ctx: RuleContext) -> None:
            _ = plan.inner  # type: ignore[attr-defined]  # rewrite sees only what check planned

    class _RewritesTheMatch(_CancelDoubleNeg):
        def rewrite(self, plan: _NegPair, ctx: RuleContext) -> None:  # type: ignore[override]
            pass

    def _check_returns_plan_or_decline(match: _NegPair, ctx: RuleContext) -> None:
        verdict = _CancelDoubleNeg().check(match, ctx)
        _ = verdict.source  # type: ignore[union-attr]  # a Decline until isinstance says otherwise
        if not isinstance(verdict, Decline):
            _ = verdict.source.name  # narrowed to the plan: fine


def test_rewrite_gets_the_plan_check_returned():
    rule = _CancelDoubleNeg()
    out, stats = apply(make_model(_DOUBLE_NEG), rule)
    assert histogram(out) == {"Relu": 1}
    assert stats.applied["cancel-double-neg"] == 1
    assert len(rule.checked) == 1 and len(rule.rewritten) == 1
    assert rule.rewritten[0] is rule.checked[0]  # the same object: nothing recomputed


def test_declined_plan_never_reaches_rewrite():
    model = make_model(_DOUBLE_NEG.replace("=> (float[2,3] y)", "=> (float[2,3] y, float[2,3] a)"))
    rule = _CancelDoubleNeg()
    _, stats = apply(model, rule)
    assert rule.rewritten == []
    assert [type(v) for v in rule.checked] == [Decline]
    assert stats.declined == {("cancel-double-neg", "inner Neg has other readers"): 1}


@dataclass
class _Anchor:
    node: gs.Node


class _AlwaysDecline(Rule[_Anchor, _Anchor]):
    """Matches every Relu and declines it, with the reason ctx.options["reason"] (default fixed)."""

    name = "always-decline"
    op_types = ("Relu",)

    def match(self, node: gs.Node, ctx: RuleContext) -> _Anchor | None:
        return _Anchor(node)

    def check(self, match: _Anchor, ctx: RuleContext) -> _Anchor | Decline:
        return Decline(str(ctx.options.get("reason", "never")))

    def rewrite(self, plan: _Anchor, ctx: RuleContext) -> None:
        raise AssertionError("declined matches are never rewritten")


_TWO_RELUS = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[2,3] x) => (float[2,3] y) {
    a = Relu (x)
    b = Neg (a)
    y = Relu (b)
}
"""


def _churn(sweeps: int):
    """A function pass that reports a change on its first `sweeps` calls (forcing more sweeps)."""
    calls: list[int] = []

    def churn(graph: gs.Graph, ctx: RuleContext) -> bool:
        calls.append(1)
        return len(calls) <= sweeps

    return FunctionPass("churn", churn), calls


def test_decline_counts_once_per_match_over_many_sweeps():
    # rewrite_model re-imports the graph every sweep (shape inference), so node objects change
    # between sweeps: the site is keyed by name (here: the unnamed nodes' output names).
    churn, calls = _churn(3)
    _, stats = rewrite_model(
        make_model(_TWO_RELUS), [RulePass("declines", [_AlwaysDecline()]), churn]
    )
    assert len(calls) == 4  # four sweeps met both Relus
    assert stats.declined == {("always-decline", "never"): 2}
    assert len(stats.decline_sites) == 2


def test_decline_with_a_new_reason_moves_its_count():
    graph = gs.import_onnx(make_model(_TWO_RELUS))
    ctx = _ctx(graph)

    def next_reason(g: gs.Graph, c: RuleContext) -> bool:
        sweep = int(c.options.get("sweep", 0)) + 1
        c.options["sweep"] = sweep
        c.options["reason"] = f"reason {min(sweep, 2)}"
        return sweep < 3

    manager = PassManager(
        [FunctionPass("reason", next_reason), RulePass("declines", [_AlwaysDecline()])]
    )
    manager(graph, ctx)
    assert ctx.stats.declined == {("always-decline", "reason 2"): 2}


def test_decline_is_withdrawn_when_the_rule_applies_later():
    # Sweep 1: the inner Neg's output is also read by a dead Identity, so the rule declines;
    # dead-code then drops that reader, and sweep 2 folds the pair. What counts as declined in
    # the end is only what was never rewritten.
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[2,3] x) => (float[2,3] y) {
            a = Neg (x)
            b = Neg (a)
            c = Identity (a)
            y = Relu (b)
        }
        """
    )
    rule = _CancelDoubleNeg()
    out, stats = apply(model, [rule, FunctionPass("dead-code", remove_dead_code)])
    assert histogram(out) == {"Relu": 1}
    assert isinstance(rule.checked[0], Decline)
    assert rule.rewritten == [rule.checked[1]]
    assert stats.applied["cancel-double-neg"] == 1
    assert stats.declined == {}
    assert stats.decline_sites == {}


def test_default_pipeline_counts_each_declined_pattern_once():
    # The Constant nodes become initializers in sweep 1, so the pipeline sweeps at least twice;
    # each GELU (opset 13 < 20) and the HardSigmoid (fuse-hard-swish needs opset 14) count once.
    model = make_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        agraph (float[4,32] x, float[4,32] z) => (float[4,32] y, float[4,32] w, float[4,32] v) {
            half = Constant <value = float {0.5}> ()
            one = Constant <value = float {1.0}> ()
            sqrt2 = Constant <value = float {1.4142135}> ()
            t = Div (x, sqrt2)
            e = Erf (t)
            a = Add (e, one)
            h = Mul (x, half)
            y = Mul (h, a)
            t2 = Div (z, sqrt2)
            e2 = Erf (t2)
            a2 = Add (e2, one)
            h2 = Mul (z, half)
            w = Mul (h2, a2)
            s = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)
            v = Mul (x, s)
        }
        """
    )
    _, stats = rewrite_model(model)
    assert stats.applied["constants-to-initializers"] == 1
    assert stats.declined[("fuse-gelu", "Gelu needs opset 20")] == 2
    assert stats.declined[("fuse-hard-swish", "needs opset 14, model has 13 (see --opset)")] == 1
