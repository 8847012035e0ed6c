"""The pass and rule machinery.

A *pass* takes a graph and returns `PassResult(graph, modified)`. A *rule* is a local rewrite
in three parts, after onnxscript's rewriter, typed `Rule[MatchT, PlanT]`:

1. `match(node, ctx) -> MatchT | None`: the pattern, anchored at a node whose op is in
   `rule.op_types`; returns a match object (a dataclass holding the matched nodes and
   tensors) or None. Matching never mutates the graph, and its state lives in the match
   object, never on the rule instance (one instance serves every graph).
2. `check(match, ctx) -> PlanT | Decline`: preconditions; returns the plan the rewrite
   executes (everything check computed on the way: folded weights, resolved shapes; the match
   itself when there is nothing more) or `Decline(reason)` ("weight is not a constant
   initializer").
3. `rewrite(plan, ctx)`: performs the replacement on the graph from the plan alone; it does
   not recompute what check computed.

A decline is counted once per match site, the rule's anchor node, however many fixed-point
sweeps meet it again; when the rule applies at that site later (another rule removed the
obstacle) the decline is withdrawn (`PassStats.decline`, `PassStats.resolve`).

`RulePass` applies an ordered list of rules to a graph and all its subgraphs. `PassManager`
repeats a sequence of passes until none modifies the graph (a fixed point) or a step limit is
reached; when a pass raises, the error names it and the passes that ran before it. An optional
`check_between(graph, pass_name)` hook runs after every pass that modified the graph; when it
raises `PassCheckFailed`, the manager raises `BrokenPassError` naming that pass, the rules it
applied, and the passes before it (`optimize --debug-verify` uses it).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import onnx_graphsurgeon as gs

from onnxshrink.engine.graph import all_graphs, forget_names, is_default_domain
from onnxshrink.errors import OnnxShrinkError

logger = logging.getLogger(__name__)

MatchT = TypeVar("MatchT")
PlanT = TypeVar("PlanT")


@dataclass
class PassResult:
    """What a pass returns: the (possibly same) graph and whether anything changed."""

    graph: gs.Graph
    modified: bool


#: the site of a decline that concerns a whole rule, not one match (e.g. the opset is too low)
WHOLE_MODEL = "*"


@dataclass
class PassStats:
    """Per-rule bookkeeping that ends up in the optimize report.

    `declined` counts distinct match sites by (rule, reason): a site that declines on every
    fixed-point sweep counts once (with its latest reason), and not at all once the rule
    applied there. Record declines through `decline`, so that `declined` stays in step with
    the sites behind it.
    """

    applied: Counter[str] = field(default_factory=Counter)
    declined: Counter[tuple[str, str]] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: (rule, site) -> the reason that site is counted under in `declined`
    decline_sites: dict[tuple[str, str], str] = field(default_factory=dict)

    def decline(self, rule: str, site: str, reason: str) -> bool:
        """Count `rule` declining at `site` once; True when this is news (new site or reason)."""
        key = (rule, site)
        previous = self.decline_sites.get(key)
        if previous == reason:
            return False
        if previous is not None:
            self._uncount(rule, previous)
        self.decline_sites[key] = reason
        self.declined[(rule, reason)] += 1
        return True

    def resolve(self, rule: str, site: str) -> None:
        """`rule` applied at `site` after all: an earlier decline there no longer counts."""
        previous = self.decline_sites.pop((rule, site), None)
        if previous is not None:
            self._uncount(rule, previous)

    def _uncount(self, rule: str, reason: str) -> None:
        self.declined[(rule, reason)] -= 1
        if self.declined[(rule, reason)] <= 0:
            del self.declined[(rule, reason)]


@dataclass
class RuleContext:
    """What a rule may read besides the graph: opset, the root graph, options, stats."""

    graph: gs.Graph
    root: gs.Graph
    opset: int
    stats: PassStats
    options: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    """Anything with a name that maps a graph to a PassResult."""

    name: str

    def __call__(self, graph: gs.Graph, ctx: RuleContext) -> PassResult: ...


@dataclass(frozen=True)
class Decline:
    """What `Rule.check` returns to refuse a match: the reason, shown by `optimize -v`."""

    reason: str


def plan_or_decline(reason: str | None, plan: PlanT) -> PlanT | Decline:
    """`plan` when `reason` is None, else `Decline(reason)`: for checks that chain reasons."""
    return plan if reason is None else Decline(reason)


class Rule(Generic[MatchT, PlanT]):
    """Base class for a pattern/check/rewrite rule; subclasses set `name` and `op_types`.

    Subclass as `Rule[MyMatch, MyPlan]` (both dataclasses; `Rule[MyMatch, MyMatch]` when the
    check adds nothing to the match) so that mypy checks what `rewrite` reads from its plan.
    """

    name: str = "rule"
    op_types: tuple[str, ...] = ()
    #: lowest default-domain opset at which the rewrite's output ops exist
    min_opset: int = 1
    #: below `min_opset` the rule still matches, and its check declines each match with its own
    #: reason, so that `-v` counts the patterns `--opset` would fuse; otherwise the rule is
    #: skipped with one whole-model reason
    matches_below_min_opset: bool = False

    def match(self, node: gs.Node, ctx: RuleContext) -> MatchT | None:
        """Return a match object when the pattern anchored at `node` is present."""
        raise NotImplementedError

    def check(self, match: MatchT, ctx: RuleContext) -> PlanT | Decline:
        """Return the plan `rewrite` executes when the rewrite is legal, else `Decline(reason)`."""
        raise NotImplementedError

    def rewrite(self, plan: PlanT, ctx: RuleContext) -> None:
        """Replace the matched pattern in `ctx.graph` as `plan` (from `check`) says."""
        raise NotImplementedError


def match_site(graph: gs.Graph, node: gs.Node) -> str:
    """The identity of a match anchored at `node`, stable across sweeps and graph re-imports.

    Node names (or, for unnamed nodes, the first output's name, unique in SSA form) survive
    the shape-inference pass's export and re-import, where node objects do not.
    """
    return f"{graph.name}/{node.name or node.outputs[0].name}"


class RulePass:
    """Apply `rules`, in order, to every node of a graph and of its subgraphs."""

    def __init__(self, name: str, rules: Sequence[Rule[Any, Any]]):
        self.name = name
        self.rules = list(rules)

    def __call__(self, graph: gs.Graph, ctx: RuleContext) -> PassResult:
        modified = False
        for sub in list(all_graphs(graph)):
            sub_ctx = RuleContext(sub, ctx.root, ctx.opset, ctx.stats, ctx.options)
            present = {node.op for node in sub.nodes}
            for rule in self.rules:
                if present.isdisjoint(rule.op_types):
                    continue
                if rule.min_opset > ctx.opset and not rule.matches_below_min_opset:
                    reason = f"needs opset {rule.min_opset}, model has {ctx.opset} (see --opset)"
                    ctx.stats.decline(rule.name, WHOLE_MODEL, reason)
                    continue
                start = time.perf_counter()
                modified |= self._apply(rule, sub, sub_ctx)
                ctx.stats.seconds[rule.name] += time.perf_counter() - start
        return PassResult(graph, modified)

    @staticmethod
    def _apply(rule: Rule[Any, Any], graph: gs.Graph, ctx: RuleContext) -> bool:
        modified = False
        for node in list(graph.nodes):
            if node.op not in rule.op_types or not node.outputs or not is_default_domain(node):
                continue
            match = rule.match(node, ctx)
            if match is None:
                continue
            site = match_site(graph, node)
            verdict = rule.check(match, ctx)
            if isinstance(verdict, Decline):
                if ctx.stats.decline(rule.name, site, verdict.reason):
                    logger.debug("%s declined at %s: %s", rule.name, site, verdict.reason)
                continue
            rule.rewrite(verdict, ctx)
            ctx.stats.resolve(rule.name, site)
            ctx.stats.applied[rule.name] += 1
            modified = True
        return modified


class FunctionPass:
    """Wrap a `graph, ctx -> bool` function (bool: modified) as a named pass."""

    def __init__(self, name: str, fn: Callable[[gs.Graph, RuleContext], bool]):
        self.name = name
        self.fn = fn

    def __call__(self, graph: gs.Graph, ctx: RuleContext) -> PassResult:
        start = time.perf_counter()
        modified = bool(self.fn(graph, ctx))
        ctx.stats.seconds[self.name] += time.perf_counter() - start
        if modified:
            ctx.stats.applied[self.name] += 1
        return PassResult(graph, modified)


class PassError(RuntimeError):
    """A pass raised; the message names it and the passes that ran before it."""


class PassCheckFailed(Exception):
    """Raised by a `check_between` hook: the graph after the pass is broken; the message says how.

    `kind` names the check that failed ("checker", "parity").
    """

    def __init__(self, message: str, kind: str = "check"):
        super().__init__(message)
        self.kind = kind


class BrokenPassError(PassError, OnnxShrinkError):
    """A check between passes found the model broken; names the pass, its rules, the passes before.

    `kind` is the check that failed (`PassCheckFailed.kind`); `rules` counts what the broken
    pass applied (its rules, or its own name for a function pass).
    """

    def __init__(self, message: str, pass_name: str, kind: str, rules: Counter[str]):
        super().__init__(message)
        self.pass_name = pass_name
        self.kind = kind
        self.rules = rules


_NAMED_BEFORE = 5  # how many earlier passes an error names


class PassManager:
    """Run passes in sequence until a fixed point or `max_steps` sweeps.

    `check_between(graph, pass_name)`, when given, runs after every pass that modified the
    graph (after cleanup and toposort); it raises `PassCheckFailed` when the graph is broken.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        max_steps: int = 10,
        check_between: Callable[[gs.Graph, str], None] | None = None,
    ):
        self.passes = list(passes)
        self.max_steps = max_steps
        self.check_between = check_between

    def __call__(self, graph: gs.Graph, ctx: RuleContext) -> PassResult:
        any_modified = False
        history: list[str] = []
        for step in range(self.max_steps):
            sweep_modified = False
            for p in self.passes:
                # what this pass applies, for naming it when the check after it fails
                applied_before = Counter(ctx.stats.applied) if self.check_between else Counter()
                try:
                    result = p(graph, ctx)
                except Exception as exc:
                    raise PassError(
                        f"pass {p.name!r} failed ({type(exc).__name__}: {exc}); "
                        f"passes before it: {_named(history)}"
                    ) from exc
                graph = result.graph
                ctx.graph = ctx.root = graph
                if result.modified:
                    graph.cleanup(remove_unused_graph_inputs=False).toposort()
                    for sub in all_graphs(graph):
                        forget_names(sub)
                    if self.check_between is not None:
                        rules = ctx.stats.applied - applied_before
                        self._check(graph, p.name, step, rules, history)
                history.append(p.name)
                sweep_modified |= result.modified
            any_modified |= sweep_modified
            if not sweep_modified:
                logger.debug("fixed point after %d sweep(s)", step + 1)
                break
        else:
            logger.info("stopped after %d sweeps without reaching a fixed point", self.max_steps)
        return PassResult(graph, any_modified)

    def _check(
        self, graph: gs.Graph, name: str, step: int, rules: Counter[str], history: list[str]
    ) -> None:
        assert self.check_between is not None
        try:
            self.check_between(graph, name)
        except PassCheckFailed as exc:
            applied = ", ".join(f"{rule} x{n}" for rule, n in sorted(rules.items())) or "none"
            raise BrokenPassError(
                f"pass {name!r} (sweep {step + 1}) broke the model: {exc}; applied in it: "
                f"{applied}; passes before it: {_named(history)}",
                name,
                exc.kind,
                rules,
            ) from exc


def _named(history: list[str]) -> str:
    """The last passes of `history`, for an error message."""
    if not history:
        return "none"
    named = ", ".join(history[-_NAMED_BEFORE:])
    return named if len(history) <= _NAMED_BEFORE else f"..., {named}"
