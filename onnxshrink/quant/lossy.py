"""Lossy stages: the engine every lossy rule module runs on (int8, fp16, int4, pruning).

A lossy stage changes numbers, so it is a *plan* and its *materialization*, chosen within an
error budget and verified on held-out data. The stage modules live in `rules/` beside the
lossless rules and are listed in `onnxshrink.rules.LOSSY_STAGES`; the engine here never
needs editing to add one.

1. The contract. A stage has a `name` (the value of `--quantize`), a one-line `summary`, and
   `run(model, calibration, settings) -> StageResult`. A stage built on `PlannedStage` only
   writes `plan` and `materialize`, and inherits `run` (3):
   a. `plan(model, profile, exclude) -> Plan`: every unit (layer) the stage could change on
      this target, with what it would do to it, and every unit it declines with the reason
      ("excluded by 'Conv'", "not a default-domain op", ...);
   b. `materialize(model, plan) -> (model, notes)`: the model with the plan applied.
   A stage with more to do (int8: statistics, bias correction, a speed check) writes its own
   `run` from the same parts.
2. Data (`as_calibration_data`): calibration samples from any source users bring (an .npz of
   N samples along axis 0, a folder, a loader script, `random`, a list of feed dicts), cut
   into runs of at most `calibration_batch` samples and streamed.
3. The generic run (`PlannedStage.run`):
   a. the model's nodes are named once (`onnxshrink.engine.io.named_copy`), so plans name units;
   b. the float model's outputs on the first `sensitivity.DEFAULT_SAMPLES` calibration
      samples are the reference (`sensitivity.ErrorReference`);
   c. the full plan is materialized and measured (`onnxshrink.verify.measure`'s figure: the
      worst channel group's noise-to-signal ratio); over `max_error`, a plan of more than
      `ISOLATE_ABOVE` units is first searched for the few units that break it
      (`budget.isolate`, group testing: about 2 k log2(N) measurements for k culprits), and
      those are declined if that meets the budget; otherwise each unit is measured alone
      (`budget.rank`) and the fewest most sensitive units are declined
      (`budget.decline_fewest`) until the budget holds. A stage whose units differ in what
      they save (`unit_sizes`: int4's embedding table against one linear layer) has them
      declined by error per byte saved instead, so that the result is the smallest that
      meets the budget rather than the one with the fewest units declined;
   d. the result: the model, the plan as materialized, every unit's decision, the budget's
      figures and the time each phase took.
4. The target profile (`onnxshrink.quant.targets`) says what the runtime accepts; stages read it
   instead of comparing target names.
5. `held_out_check` judges any stage's model against the original on held-out feeds, with
   the budget's figure per output, cosine, SNR, argmax agreement and a user's task metric.
6. `speed_check` times models against each other on ORT CPU, interleaved in one process
   (medians), for stages that choose between layouts by speed.
7. Stages chain (`ChainedStage`): `--sparsify` with `--quantize` prunes first, then quantizes
   the pruned model, each stage within its own budget against the model it starts from.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

from onnxshrink.engine.io import inference_session, named_copy
from onnxshrink.engine.protos import compile_excludes
from onnxshrink.errors import UsageError
from onnxshrink.quant.budget import decline_fewest, isolate, rank
from onnxshrink.quant.calibration import (
    DEFAULT_BATCH,
    METHODS,
    CalibrationData,
    calibration_feeds,
)
from onnxshrink.quant.sensitivity import (
    DEFAULT_MAX_ERROR,
    DEFAULT_SAMPLES,
    RANKING_SAMPLES,
    BudgetReport,
    ErrorReference,
    LayerError,
)
from onnxshrink.quant.targets import TargetProfile, target_profile
from onnxshrink.verify.measure import OutputNoise, TaskMetric, mask_input
from onnxshrink.verify.parity import (
    DEFAULT_TIME_LIMIT,
    Reference,
    check_parity,
    declared_batches,
    feed_samples,
    split_feed,
)

if TYPE_CHECKING:
    from onnxshrink.quant.sparsity import SparsifySpec
    from onnxshrink.rules.qdq import QuantizeReport

logger = logging.getLogger(__name__)

#: progress(stage, done, total): the phase ("calibration", "sensitivity", ...); total 0 if unknown
StagedProgress = Callable[[str, int, int], None]
Feed = dict[str, np.ndarray]
#: what a stage's `run` takes as calibration data (module docstring, 2)
CalibrationSource = str | Path | CalibrationData | Iterable[Mapping[str, np.ndarray]]

HOW_TO_CALIBRATE = "--calibration-data calib.npz | folder | loader.py[:fn] | random"
#: ONNX Runtime providers the calibration pass may run on
PROVIDERS = ("cpu", "cuda")
#: a plan of more units than this that fails by far is first searched by group testing (3c)
ISOLATE_ABOVE = 32
#: timed runs per model in the speed check (module docstring, 6)
SPEED_RUNS = 20
#: what a unit a stage of each family left alone is, for reports
KEPT_AS = {"quantization": "float", "pruning": "dense"}


@dataclass
class Plan:
    """What a lossy stage will do (module docstring, 1a): units it applies to, with what, and
    units it declines, with why."""

    stage: str
    target: str
    applied: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)

    def declining(self, reasons: Mapping[str, str]) -> Plan:
        """This plan with the units of `reasons` moved to the declined ones."""
        applied = {u: what for u, what in self.applied.items() if u not in reasons}
        declined = dict(self.declined)
        declined.update((u, r) for u, r in reasons.items() if u in self.applied)
        return Plan(self.stage, self.target, applied, declined)

    def only(self, unit: str) -> Plan:
        """This plan with every applied unit but `unit` declined (the unit measured alone)."""
        return self.declining({u: "not the unit measured" for u in self.applied if u != unit})


@dataclass(frozen=True)
class StageSettings:
    """What the user asked of a lossy stage (the `optimize` options it reads)."""

    target: str = "ort-cpu"
    exclude: tuple[str, ...] = ()
    max_error: float = DEFAULT_MAX_ERROR
    calibration_batch: int = DEFAULT_BATCH
    method: str = "percentile"
    provider: str = "cpu"
    check_speed: bool = True
    progress: StagedProgress | None = None
    #: int8's statistics pass on this many shards in worker processes (1: in this process)
    calibration_workers: int = 1
    #: the sensitivity ranking's candidates measured in this many worker processes
    #: (`onnxshrink.quant.fanout`; 1: in this process)
    search_workers: int = 1
    #: the input masking padded positions: a name, "none", or None to find the convention's
    mask_input: str | None = None
    #: int4 (`onnxshrink.rules.int4`): block size, rtn or gptq, symmetric grid, MatMulNBits'
    #: accuracy_level
    block_size: int = 32
    int4_method: str = "gptq"
    symmetric: bool = False
    accuracy_level: int = 4
    #: pruning (`onnxshrink.quant.sparsity`): the parsed `--sparsify`, and `--compress` (pruned
    #: weights stored packed: `onnxshrink.rules.sparsify_weights`)
    sparsity: SparsifySpec | None = None
    compress: bool = False
    #: channels: refit the layers after pruned channels to the original's outputs
    reconstruct: bool = True


@dataclass(frozen=True)
class LayerDecision:
    """One unit of a lossy stage (a layer): changed or kept as it was, and why.

    `precision` is what the unit computes in: the stage's ("int8", "float16") or "float".
    `error` is the output error with this unit changed alone, when the ranking ran.
    """

    name: str
    op: str
    precision: str
    reason: str | None = None
    error: float | None = None


@dataclass(frozen=True)
class OutputError:
    """Held-out figures of one output: quantized model against the original."""

    name: str
    cosine: float
    snr_db: float
    nsr: float
    argmax_agreement: float | None = None
    floating: bool = True


@dataclass
class HeldOutCheck:
    """`held_out_check`'s result. `error` is the budget's figure: the worst float output's
    per-group NSR (`onnxshrink.verify.measure`).

    `held_out` is False when the feeds were generated or are the calibration data itself;
    `source` says where they came from. `verified` is False when a model could not run (then
    `reason` says why and there are no figures).
    """

    samples: int
    source: str
    held_out: bool
    verified: bool = True
    reason: str | None = None
    outputs: list[OutputError] = field(default_factory=list)
    error: float = 0.0
    #: the user's task metric (`--metric`) and its mean over the held-out batches
    metric: str | None = None
    metric_value: float | None = None
    #: the samples the `samples` runs held along axis 0 (`ParityReport.rows`)
    rows: int = 0


@dataclass(frozen=True)
class SpeedCheck:
    """Median ms per run on ORT CPU (`speed_check`): the float model, the stage's compute
    (int8), and float compute with int8 weights (None when there was no such candidate);
    `chosen` is "int8" or "weights"; `float_apart`: the float model was timed in runs of its
    own, not interleaved with the others (a large model, to spare memory).
    """

    float_ms: float
    int8_ms: float
    runs: int
    weights_ms: float | None = None
    chosen: str = "int8"
    float_apart: bool = False
    #: the shape of each input of the feed the models were timed on
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def how(self) -> str:
        """How the figures were timed, for reports: "median of N interleaved runs", ..."""
        if self.float_apart:
            return f"median of {self.runs} runs; the float model timed apart, not interleaved"
        return f"median of {self.runs} interleaved runs"

    @property
    def result_ms(self) -> float:
        return self.weights_ms if self.chosen == "weights" and self.weights_ms else self.int8_ms

    @property
    def ratio(self) -> float:
        """The result's time over the float model's."""
        return self.result_ms / self.float_ms if self.float_ms > 0 else math.inf


@dataclass
class StageResult:
    """What a lossy stage did (module docstring, 3d); int8 fills its own fields too."""

    stage: str
    model: onnx.ModelProto
    target: str
    calibration: str
    feeds: int
    synthetic: bool
    budget: BudgetReport
    layers: list[LayerDecision] = field(default_factory=list)
    #: seconds per phase, e.g. "statistics", "sensitivity", "speed check"
    timings: dict[str, float] = field(default_factory=dict)
    #: calibration samples (0 when the source did not say) and the run size they were cut to
    samples: int = 0
    batch: int = DEFAULT_BATCH
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None
    #: int8: the calibration method, the statistics pass's seconds, QDQ report, speed check
    method: str | None = None
    seconds: float = 0.0
    quantize: QuantizeReport | None = None
    speed: SpeedCheck | None = None
    #: a chained stage's parts (`ChainedStage`), in the order they ran
    stages: list[StageResult] = field(default_factory=list)
    #: what kind of stage: "quantization" or "pruning" (reports title and word it by this)
    family: str = "quantization"

    @property
    def kept_as(self) -> str:
        """What a unit the stage left alone is: "float" (quantization), "dense" (pruning)."""
        return KEPT_AS.get(self.family, "unchanged")

    @property
    def quantized(self) -> list[LayerDecision]:
        """The units changed by the stage."""
        return [layer for layer in self.layers if layer.precision != "float"]

    @property
    def kept_float(self) -> list[LayerDecision]:
        """The units left as they were, each with its reason."""
        return [layer for layer in self.layers if layer.precision == "float"]


class LossyStage(Protocol):
    """The contract of a lossy stage (module docstring, 1). A stage may also define
    `check(settings)`, raising UsageError for settings of its own it does not take: `optimize`
    calls it before any work; and `finish(model, result) -> (model, notes)`, what it does last
    when a later stage runs after it (`ChainedStage`: pruning's `--compress` packs the weights
    once quantization has read them)."""

    name: str
    summary: str

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult: ...


class PlannedStage:
    """A stage written as `plan` + `materialize`; `run` is the engine's (module docstring, 3)."""

    name = ""
    summary = ""
    #: what an applied unit computes in, for the layer table ("float16", "int8", "2:4")
    precision = ""
    #: "quantization" or "pruning" (`StageResult.family`)
    family = "quantization"

    def plan(self, model: onnx.ModelProto, profile: TargetProfile, exclude: Sequence[str]) -> Plan:
        raise NotImplementedError

    def materialize(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
        raise NotImplementedError

    def unit_sizes(self, model: onnx.ModelProto, plan: Plan) -> dict[str, int]:
        """Bytes each applied unit saves (module docstring, 3c); empty: units count alike."""
        return {}

    def _isolate(
        self,
        model: onnx.ModelProto,
        plan: Plan,
        measure: Callable[[onnx.ModelProto, str], float],
        max_error: float,
        budget: BudgetReport,
    ) -> tuple[onnx.ModelProto, Plan, list[str]] | None:
        """Module docstring 3c: the few units that break the full plan, found by group testing
        (`budget.isolate`) and declined; None when declining them does not meet the budget."""

        def fails_alone(group: Sequence[str]) -> bool:
            keep = set(group)
            alone = plan.declining({u: "not in the group" for u in plan.applied if u not in keep})
            return measure(self.materialize(model, alone)[0], f"{len(group)} unit(s)") > max_error

        culprits = isolate(list(plan.applied), fails_alone)
        if len(culprits) > len(plan.applied) // 4:  # not a few culprits: rank them all
            return None
        declined = plan.declining(
            {u: "isolated: the stage fails with it (group testing)" for u in culprits}
        )
        built, notes = self.materialize(model, declined)
        error = measure(built, f"{len(culprits)} isolated unit(s) declined")
        budget.steps.append((len(culprits), error))
        if error > max_error:
            return None
        budget.final_error = error
        budget.kept_float = {u: math.inf for u in culprits}
        return built, declined, notes

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        """Plan, budget, materialize (module docstring, 3); `model` is kept."""
        profile = target_profile(settings.target)
        progress = settings.progress
        timings: dict[str, float] = {}
        model = named_copy(model)  # 3a
        data = as_calibration_data(calibration, model, settings.calibration_batch)
        start = time.perf_counter()
        reference = ErrorReference.from_model(model, data, DEFAULT_SAMPLES)  # 3b
        reference.mask = mask_input(model, settings.mask_input)
        timings["reference"] = time.perf_counter() - start
        plan = self.plan(model, profile, settings.exclude)
        ops = {n.name: n.op_type for n in model.graph.node}
        budget = BudgetReport(max_error=settings.max_error)
        start = time.perf_counter()

        def measure(candidate: onnx.ModelProto, what: str, limit: int | None = None) -> float:
            budget.sessions += 1
            return reference.error(candidate, what, limit)

        full, notes = self.materialize(model, plan)  # 3c
        budget.full_error = budget.final_error = measure(full, f"{self.name}: every unit")
        budget.steps.append((0, budget.full_error))
        chosen, chosen_plan = full, plan
        isolated = None
        if budget.full_error > settings.max_error and len(plan.applied) > ISOLATE_ABOVE:
            isolated = self._isolate(model, plan, measure, settings.max_error, budget)
        if isolated is not None:
            chosen, chosen_plan, notes = isolated
        elif budget.full_error > settings.max_error and plan.applied:
            units = list(plan.applied)
            ranked = rank(
                units,
                _UnitAlone(self, model, plan, reference),
                None if progress is None else (lambda d, t: progress("sensitivity", d, t)),
                settings.search_workers,
            )
            budget.sessions += len(units)
            errors = dict(ranked)
            budget.ranking = [LayerError(u, ops.get(u, ""), e) for u, e in ranked]

            def declined(units: Sequence[str]) -> Plan:
                return plan.declining({u: f"sensitive: error {errors[u]:.3g} alone" for u in units})

            built_notes: dict[int, list[str]] = {}

            def build(units: Sequence[str]) -> onnx.ModelProto:
                built, built_note = self.materialize(model, declined(units))
                built_notes[id(built)] = built_note
                return built

            def error(built: onnx.ModelProto, k: int) -> float:
                value = measure(built, f"{k} unit(s) declined")
                budget.steps.append((k, value))
                return value

            order = [u for u, _ in ranked]
            sizes = self.unit_sizes(model, plan)
            if sizes:  # the most error per byte saved goes first: the smallest result
                order.sort(key=lambda u: -errors[u] / max(sizes.get(u, 1), 1))
            search = decline_fewest(order, build, error, settings.max_error)
            kept = order[: search.k]
            budget.kept_float = {u: errors[u] for u in kept}
            chosen_plan = declined(kept)
            if search.built is not None:
                chosen, budget.final_error = search.built, search.error
            else:  # even every unit declined fails: nothing changes
                chosen_plan = plan.declining(
                    {u: f"sensitive: error {errors[u]:.3g} alone" for u in plan.applied}
                )
                chosen, budget.final_error = model, 0.0
            notes = built_notes.get(id(search.built), []) if search.built is not None else []
        timings["sensitivity"] = time.perf_counter() - start
        logger.info(
            "%s: error %.4g -> %.4g, %d unit(s) declined for accuracy (%d sessions, %.1f s)",
            self.name,
            budget.full_error,
            budget.final_error,
            len(budget.kept_float),
            budget.sessions,
            timings["sensitivity"],
        )
        alone = {e.name: e.error for e in budget.ranking}
        layers = [
            LayerDecision(u, ops.get(u, ""), self.precision, None, alone.get(u))
            for u in chosen_plan.applied
        ] + [
            LayerDecision(u, ops.get(u, ""), "float", reason, alone.get(u))
            for u, reason in chosen_plan.declined.items()
        ]
        return StageResult(
            stage=self.name,
            model=chosen,
            target=profile.name,
            calibration=data.source,
            feeds=len(reference.feeds),
            synthetic=bool(data.synthetic),
            budget=budget,
            layers=layers,
            timings=timings,
            samples=sum(reference.counts),  # the samples measured: the reference's
            batch=settings.calibration_batch,
            notes=notes + mask_notes(reference.mask),
            plan=chosen_plan,
            family=self.family,
        )


@dataclass(frozen=True)
class _UnitAlone:
    """One unit's ranking measurement (module docstring, 3c): the stage's plan with that unit
    alone applied, materialized and measured on the reference. Picklable when the stage is:
    sent once to each search worker (`onnxshrink.quant.fanout`)."""

    stage: PlannedStage
    model: onnx.ModelProto
    plan: Plan
    reference: ErrorReference

    def __call__(self, unit: str) -> float:
        built = self.stage.materialize(self.model, self.plan.only(unit))[0]
        return self.reference.error(built, f"{unit} alone", RANKING_SAMPLES)


class ChainedStage:
    """Two lossy stages, one after the other (module docstring, 7): `--sparsify` then
    `--quantize`. Each runs within its own budget against the model it starts from; the
    result's error against the float model is then measured on the calibration samples (one
    more session) and reported. The layer table holds both stages' units, the first's first."""

    def __init__(
        self, first: LossyStage, second: LossyStage, first_error: float, second_error: float
    ) -> None:
        self.first, self.second = first, second
        self.first_error, self.second_error = first_error, second_error
        self.name = f"{first.name} + {second.name}"
        self.summary = f"{first.summary}; then {second.summary}"

    def check(self, settings: StageSettings) -> None:
        for stage in (self.first, self.second):
            check = getattr(stage, "check", None)
            if check is not None:
                check(settings)

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        import dataclasses

        data = as_calibration_data(calibration, model, settings.calibration_batch)
        first = self.first.run(
            model, data, dataclasses.replace(settings, max_error=self.first_error, compress=False)
        )
        second = self.second.run(
            first.model,
            data,
            dataclasses.replace(settings, max_error=self.second_error, compress=False),
        )
        finish = getattr(self.first, "finish", None)
        finished: list[str] = []
        if settings.compress and finish is not None:  # packing goes last: the second stage
            second.model, finished = finish(second.model, first)  # reads plain weights
        start = time.perf_counter()
        reference = ErrorReference.from_model(model, data, DEFAULT_SAMPLES)
        reference.mask = mask_input(model, settings.mask_input)
        name = f"{first.stage} + {second.stage}"
        error = reference.error(second.model, f"the {name} model")
        budget = dataclasses.replace(
            second.budget,
            max_error=self.first_error + self.second_error,
            full_error=error,
            final_error=error,
            sessions=first.budget.sessions + second.budget.sessions + 1,
        )
        changed = [u for u in first.layers if u.precision != "float"]
        taken = {u.name for u in changed}
        second_names = {u.name for u in second.layers}
        layers = (
            changed
            + [u for u in second.layers if u.name not in taken or u.precision != "float"]
            + [u for u in first.layers if u.precision == "float" and u.name not in second_names]
        )
        timings = {f"{first.stage} {k}": v for k, v in first.timings.items()}
        timings.update((f"{second.stage} {k}", v) for k, v in second.timings.items())
        timings["final error"] = time.perf_counter() - start
        notes = [
            *first.notes,
            f"error against the float model (calibration samples): {first.stage} "
            f"{first.budget.final_error:.3g} (budget {self.first_error:g}), {second.stage} "
            f"on top of it {second.budget.final_error:.3g} (budget {self.second_error:g}), both "
            f"{error:.3g}",
            *[n for n in second.notes if n not in first.notes],
            *finished,
        ]
        return dataclasses.replace(
            second,
            stage=name,
            budget=budget,
            layers=layers,
            notes=notes,
            timings=timings,
            stages=[first, second],
            family=f"{first.family}, then {second.family}",
        )


def speed_check(
    float_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    feed: Feed,
    runs: int = SPEED_RUNS,
    *,
    weights_model: onnx.ModelProto | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SpeedCheck:
    """Median ms per run of the models on ORT CPU, interleaved (module docstring, 6).

    Two warm-up runs each (first runs allocate), then `runs` rounds that run every model
    once; intra-op spinning off, so that one session's idle threads do not slow the next.
    `progress(done, runs)` is called after each round.
    """
    models = [float_model, int8_model] + ([weights_model] if weights_model is not None else [])
    medians = interleaved_ms(models, feed, runs, progress)
    return SpeedCheck(
        medians[0],
        medians[1],
        runs,
        medians[2] if len(medians) > 2 else None,
        input_shapes={name: [int(d) for d in np.shape(value)] for name, value in feed.items()},
    )


def interleaved_ms(
    models: Sequence[onnx.ModelProto],
    feed: Feed,
    runs: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Median ms per run of each model on ORT CPU, timed interleaved (`speed_check`);
    `progress(done, runs)` after each round."""
    import onnxruntime as ort

    def session(model: onnx.ModelProto):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return inference_session(model, options, ["CPUExecutionProvider"])

    sessions = [session(m) for m in models]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [{k: v for k, v in feed.items() if k in n} for n in names]
    times: list[list[float]] = [[] for _ in sessions]
    for s, f in zip(sessions, feeds, strict=True):  # warm-up: first runs allocate
        s.run(None, f)
        s.run(None, f)
    for done in range(1, runs + 1):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress(done, runs)
    return [float(np.median(t)) for t in times]


def check_settings(
    *,
    method: str = "percentile",
    target: str = "ort-cpu",
    exclude: Sequence[str] = (),
    max_error: float = DEFAULT_MAX_ERROR,
    provider: str = "cpu",
) -> None:
    """Raise UsageError (one line) for a bad calibration method, target, `--exclude` regex,
    budget or calibration provider: what `optimize` checks before any work."""
    if method not in METHODS:
        raise UsageError(f"--calibration-method {method!r}: expected one of {', '.join(METHODS)}")
    target_profile(target)  # UsageError for an unknown target
    if provider not in PROVIDERS:
        raise UsageError(
            f"--calibration-provider {provider!r}: expected one of {', '.join(PROVIDERS)}"
        )
    compile_excludes(exclude)
    if not (isinstance(max_error, (int, float)) and math.isfinite(max_error) and max_error >= 0):
        raise UsageError(f"--max-error {max_error}: must be a finite number >= 0")


def mask_notes(mask: str | None) -> list[str]:
    """The note saying which positions the error figures leave out, if any."""
    if mask is None:
        return []
    return [
        f"positions where input {mask!r} is 0 (padding) are left out of the error figures "
        "(--mask-input none counts them)"
    ]


def as_calibration_data(
    calibration: CalibrationSource,
    model: onnx.ModelProto,
    max_batch: int = DEFAULT_BATCH,
) -> CalibrationData:
    """The feeds of `calibration` (module docstring, 2); UsageError saying how to give them.

    Every source is cut into runs of at most `max_batch` samples where the model's batch dim
    is dynamic (`calibration.calibration_feeds`); a `CalibrationData` is used as it is.
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise UsageError(f"--calibration-batch {max_batch}: must be at least 1")
    if isinstance(calibration, (str, Path)):
        return calibration_feeds(calibration, model, max_batch=max_batch)
    if calibration is None:
        raise UsageError(f"a lossy stage needs calibration data: {HOW_TO_CALIBRATE}")
    declared = declared_batches(model)
    feeds = [run for feed in calibration for run in split_feed(dict(feed), declared, max_batch)]
    if not feeds:
        raise UsageError(f"calibration data holds no feeds: {HOW_TO_CALIBRATE}")
    samples = sum(feed_samples(f, declared) for f in feeds)
    return CalibrationData("feeds", lambda: iter(feeds), len(feeds), samples=samples)


class _Counted:
    """Iterates `data` and remembers how many feeds the last pass yielded."""

    def __init__(self, data: CalibrationData) -> None:
        self.data = data
        self.count = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Feed]:
        self.count = 0
        for feed in self.data:
            self.count += 1
            yield feed


def held_out_check(
    reference: Reference | onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[Feed],
    *,
    source: str,
    held_out: bool,
    float_outputs: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    metric: TaskMetric | None = None,
    mask: str | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> HeldOutCheck:
    """Judge a lossy stage's model against the original on `feeds` (module docstring, 5).

    `float_outputs` names the outputs that count in the error (default: all); the error is the
    budget's figure (`onnxshrink.verify.measure`: per channel group, worst output). `metric` (a
    user's task metric) is called on every batch and its mean reported. `mask` names the
    input masking padded positions (`onnxshrink.verify.measure`, 6). Never raises for ORT
    failures: the check is then unverified, with the reason; a failing metric raises
    UsageError, and a run longer than `time_limit` seconds TimeLimitError.
    """
    noises: dict[str, OutputNoise] = {}

    def observe(
        feed: Feed, names: list[str], ref: list[np.ndarray], cand: list[np.ndarray]
    ) -> None:
        positions = feed.get(mask) if mask else None
        for name, r, c in zip(names, ref, cand, strict=True):
            if np.issubdtype(np.asarray(r).dtype, np.floating):
                noises.setdefault(name, OutputNoise(cosine=True)).update(r, c, positions)
        if metric is not None:
            metric.update(names, ref, cand)

    parity = check_parity(
        reference,
        candidate,
        feeds,
        progress=progress,
        labels=("original", "quantized"),
        observe=observe,
        time_limit=time_limit,
    )
    check = HeldOutCheck(
        parity.samples, source, held_out, parity.verified, parity.reason, rows=parity.rows
    )
    if not parity.verified or not parity.outputs:
        check.verified = False
        check.reason = parity.reason or "no outputs compared"
        return check
    counted = set(float_outputs) if float_outputs is not None else None
    errors = []
    for o in parity.outputs:
        floating = (counted is None or o.name in counted) and o.name in noises
        noise = noises.get(o.name)
        if noise is not None:  # the budget's figures: masked positions left out
            cosine, snr, nsr = noise.cosine(), noise.snr_db(), noise.value()
        else:
            cosine, snr, nsr = o.cosine, o.snr_db, _nsr(o.snr_db)
        check.outputs.append(OutputError(o.name, cosine, snr, nsr, o.argmax_agreement, floating))
        if floating:
            errors.append(nsr)
    check.error = max(errors) if errors else 0.0
    if metric is not None:
        check.metric, check.metric_value = metric.spec, metric.value
    return check


def _nsr(snr_db: float) -> float:
    """sum (q - f)^2 / sum f^2 from SNR dB = 10 log10(sum f^2 / sum (q - f)^2)."""
    if math.isinf(snr_db):
        return 0.0 if snr_db > 0 else math.inf
    if math.isnan(snr_db):
        return math.nan
    return 10.0 ** (-snr_db / 10.0)


def float_output_names(model: onnx.ModelProto) -> list[str]:
    """Names of the graph outputs whose declared type is floating point."""
    floating = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
    return [
        o.name
        for o in model.graph.output
        if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in floating
    ]
