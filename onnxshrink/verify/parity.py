"""Numerical parity between a reference model and a candidate, with ONNX Runtime CPU.

Both models run on the same feeds (one session each) and every output is compared run by run.
The figures, per output, over all runs:

1. `max_abs`: the largest `|cand - ref|`.
2. `mean_abs`: the mean of `|cand - ref|` over every element of every run.
3. `max_rel`: the relative error of the worst run, `max|cand - ref| / max|ref|`: the largest
   deviation against the output's own scale, so that near-zero elements do not blow it up.
4. `cosine`: cosine similarity of the flattened outputs, all runs concatenated, in float64.
5. `snr_db`: `10 * log10(sum ref^2 / sum (cand - ref)^2)` over all runs; inf when identical.
6. `argmax_agreement`: for outputs whose last axis looks like classes, the share of positions
   (all axes but the last, all runs) whose argmax over the last axis is the same. "Looks like
   classes": a float output whose last dim is >= 2 and which is either a batch of score rows
   (rank 2, [N, C]: logits or probabilities) or, at any rank >= 2, a probability distribution
   along its last axis (non-negative rows summing to 1: per-token softmax). A feature map whose
   last axis is its width (a detector's [1, 1, H, W] map) is neither, so it gets no figure.
   The figure is informative and never decides a pass.

Cosine, SNR and mean come from running sums (sum ref*cand, ref^2, cand^2, diff^2, |diff|), so
a long stream of inputs never piles up in memory.

What passes (`Criteria`), judged per run as Polygraphy judges each iteration:

7. `--check-error-stat max` (default, the rule `optimize` uses): a run passes when
   `max|cand - ref| <= atol + rtol * max|ref|`, both maxima over that run. The small default
   `atol` (1e-6) only matters for outputs that are nearly zero everywhere (e.g. a detector's
   map on random noise), where float32 rounding alone gives a large relative figure.
8. `mean`, `median`, `quantile` (with `error_quantile`, e.g. 0.99): the same bound, but the
   left side is that statistic of the elementwise `|cand - ref|` of the run. `rtol` stays
   relative to the output's scale (its largest magnitude in the run), not elementwise: an
   elementwise `rtol * |ref_i|` explodes near zero. Median and quantiles are exact per run (one
   run's output is in memory anyway); over several runs the worst run counts, so nothing has to
   be kept across runs.
9. `min_cosine`: when set, the cosine over all runs must be at least this.
10. Integer and bool outputs must match exactly; shapes must match; NaN/inf must sit at the same
    places with the same values. Per-output overrides of `rtol`, `atol` and `min_cosine` replace
    the defaults for that output.

An output passes when every run passes (7/8), the cosine holds (9) and nothing in 10 fails.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxshrink.engine.io import inference_session, load_model
from onnxshrink.errors import TimeLimitError, UsageError, first_line, require_onnxruntime

if TYPE_CHECKING:  # localize imports this module
    from onnxshrink.verify.localize import Localization

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6
DEFAULT_ERROR_QUANTILE = 0.99
#: the largest array `generate_inputs` makes for one input
MAX_GENERATED_BYTES = 2**31
#: seconds one ONNX Runtime run of a check may take before it is stopped (`run_with_limit`)
DEFAULT_TIME_LIMIT = 600.0
ERROR_STATS = ("max", "mean", "median", "quantile")
#: generated feeds a parity run compares on when given no inputs (`parity_inputs`)
DEFAULT_GENERATED_SAMPLES = 4
# Unknown non-batch dims of generated inputs; small enough to be fast, large enough for most
# downsampling stacks (5 stride-2 stages leave 1x1).
DEFAULT_DYNAMIC_DIM = 32
#: samples per run where the model's batch dim is dynamic and no --batch is given: every
#: command cuts an .npz (axis 0: one sample per entry) into runs of at most this many
DEFAULT_BATCH = 8
#: the help of every command's --batch (optimize, parity, bench): one meaning everywhere
BATCH_HELP = (
    "Samples per run. An .npz holds one sample per entry along axis 0, whatever the model's "
    "batch dim; where that dim is dynamic, files are cut into runs of N samples (the last may "
    "be smaller) and generated inputs get N on axis 0; a model with a fixed batch dim runs "
    "that many (another N is refused). E.g. --batch 1 for a model that declares a dynamic "
    f"batch but takes one sample. \\[default: runs of at most {DEFAULT_BATCH} from files, 1 for "
    "generated inputs]"
)

_TINY = float(np.finfo(np.float32).tiny)

Progress = Callable[[int, int], None]


@dataclass
class OutputParity:
    """How far one output moved, with the tolerance it was judged by.

    `argmax_agreement` is None where it does not apply; `error_stat_value` is the worst run's
    value of the checked statistic and `bound` that run's `atol + rtol * max|ref|`.
    """

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    mean_abs: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    argmax_agreement: float | None = None
    error_stat: str = "max"
    error_stat_value: float = 0.0
    bound: float = 0.0
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    min_cosine: float | None = None
    scale: float = 0.0
    elements: int = 0
    runs: int = 0
    reason: str | None = None


@dataclass
class ParityReport:
    """The outcome of a parity run; `verified` is False when the models could not be run.

    `samples` counts the runs (feeds); `rows` the input samples they held along axis 0 (a
    file of 24 samples run in batches of 8 is 3 runs, 24 rows).
    """

    verified: bool
    passed: bool
    rtol: float
    atol: float = DEFAULT_ATOL
    samples: int = 0
    outputs: list[OutputParity] = field(default_factory=list)
    reason: str | None = None
    criteria: Criteria | None = None
    rows: int = 0
    #: where the error enters, when `parity(..., localize=...)` asked for it (not in `to_dict`)
    localization: Localization | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every figure as JSON-ready values (inf and NaN as the strings "inf", "-inf", "nan")."""
        return jsonable(
            {
                "verified": self.verified,
                "passed": self.passed,
                "samples": self.samples,
                "rows": self.rows,
                "reason": self.reason,
                "criteria": self.criteria.to_dict() if self.criteria else None,
                "rtol": self.rtol,
                "atol": self.atol,
                "outputs": [vars(o) for o in self.outputs],
            }
        )


def samples_text(runs: int, rows: int) -> str:
    """What a parity run compared on (`ParityReport.samples` runs holding `rows` samples):
    "24 input sample(s) in 3 run(s)", or "3 input sample(s)" when each run held one."""
    rows = rows or runs
    return f"{rows} input sample(s)" + ("" if rows == runs else f" in {runs} run(s)")


@dataclass
class Tolerance:
    """The bar for one output (see the module docstring, 7-9)."""

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    min_cosine: float | None = None


@dataclass
class Criteria:
    """What "the same outputs" means: tolerances, the checked statistic, per-output overrides.

    `overrides` maps an output name to the fields it replaces, e.g. `{"y": {"atol": 1e-3}}`.
    """

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    min_cosine: float | None = None
    error_stat: str = "max"
    error_quantile: float = DEFAULT_ERROR_QUANTILE
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error_stat not in ERROR_STATS:
            raise UsageError(
                f"bad error statistic {self.error_stat!r}: expected one of {', '.join(ERROR_STATS)}"
            )
        if not 0.0 <= self.error_quantile <= 1.0:
            raise UsageError(f"bad --error-quantile {self.error_quantile:g}: must be in [0, 1]")

    def for_output(self, name: str) -> Tolerance:
        """The tolerance that applies to output `name`."""
        tol = Tolerance(self.rtol, self.atol, self.min_cosine)
        for key, value in self.overrides.get(name, {}).items():
            setattr(tol, key, value)
        return tol

    def check_outputs(self, output_names: Iterable[str]) -> None:
        """Raise UsageError when an override names an output the model does not have."""
        names = list(output_names)
        unknown = [n for n in self.overrides if n not in names]
        if unknown:
            raise UsageError(
                f"tolerance override for {', '.join(repr(n) for n in unknown)}: not an output "
                f"of the reference model (outputs: {', '.join(names)})"
            )

    def stats_for(self, name: str) -> OutputStats:
        """A fresh accumulator for output `name` under these criteria."""
        tol = self.for_output(name)
        return OutputStats(
            name, tol.rtol, tol.atol, tol.min_cosine, self.error_stat, self.error_quantile
        )

    def to_dict(self) -> dict[str, Any]:
        """The criteria as plain values."""
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "min_cosine": self.min_cosine,
            "error_stat": self.error_stat,
            "error_quantile": self.error_quantile if self.error_stat == "quantile" else None,
            "overrides": {k: dict(v) for k, v in self.overrides.items()},
        }


_TOLERANCE_OPTIONS = {"atol": "--atol", "rtol": "--rtol", "min_cosine": "--min-cosine"}


def criteria_from_specs(
    atol: Iterable[str] | None = None,
    rtol: Iterable[str] | None = None,
    min_cosine: Iterable[str] | None = None,
    error_stat: str = "max",
    error_quantile: float = DEFAULT_ERROR_QUANTILE,
) -> Criteria:
    """Build Criteria from command-line strings: `VALUE` sets the default, `OUTPUT:VALUE` an override.

    The output name is everything before the last colon, so names with colons work. Raises
    UsageError naming the bad spec (not a number, negative, cosine outside [-1, 1]).
    """
    values: dict[str, Any] = {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL, "min_cosine": None}
    overrides: dict[str, dict[str, float]] = {}
    for key, specs in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine)):
        option = _TOLERANCE_OPTIONS[key]
        for spec in specs or []:
            name, sep, text = str(spec).rpartition(":")
            example = f"{option} 1e-3 or {option} OUTPUT:1e-3"
            if sep and not name:
                raise UsageError(f"bad {option} {spec!r}: empty output name (expected {example})")
            try:
                value = float(text)
            except ValueError:
                raise UsageError(
                    f"bad {option} {spec!r}: not a number (expected {example})"
                ) from None
            if math.isnan(value):
                raise UsageError(f"bad {option} {spec!r}: not a number")
            if key == "min_cosine" and not -1.0 <= value <= 1.0:
                raise UsageError(f"bad {option} {spec!r}: a cosine lies in [-1, 1]")
            if key != "min_cosine" and value < 0:
                raise UsageError(f"bad {option} {spec!r}: must not be negative")
            if sep:
                overrides.setdefault(name, {})[key] = value
            else:
                values[key] = value
    return Criteria(
        rtol=values["rtol"],
        atol=values["atol"],
        min_cosine=values["min_cosine"],
        error_stat=error_stat,
        error_quantile=error_quantile,
        overrides=overrides,
    )


def _looks_like_classes(ref: np.ndarray) -> bool:
    """Class scores along the last axis (case 6): [N, C] rows, or rows that are distributions."""
    if ref.ndim < 2 or ref.shape[-1] < 2 or ref.size == 0:
        return False
    if ref.ndim == 2:
        return True
    rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    return bool(rows.min() >= 0.0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


class OutputStats:
    """Streaming figures for one output over many runs: `update(ref, cand)` per run, `result()`.

    Memory stays bounded: running sums and maxima only (see the module docstring).
    """

    def __init__(
        self,
        name: str,
        rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL,
        min_cosine: float | None = None,
        error_stat: str = "max",
        error_quantile: float = DEFAULT_ERROR_QUANTILE,
    ):
        self.name = name
        self.rtol = rtol
        self.atol = atol
        self.min_cosine = min_cosine
        self.error_stat = error_stat
        self.error_quantile = error_quantile
        self.runs = 0
        self.elements = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.scale = 0.0
        self.sum_abs = 0.0
        self.sum_rc = 0.0
        self.sum_rr = 0.0
        self.sum_cc = 0.0
        self.sum_dd = 0.0
        self.argmax_match = 0
        self.argmax_total = 0
        self.stat_value = 0.0
        self.stat_bound = 0.0
        self._worst_excess = -math.inf
        self.reasons: list[str] = []
        self._kinds: set[str] = set()
        self._stat_failed = False

    @property
    def failing(self) -> bool:
        """True once any run has failed a per-run check."""
        return bool(self.reasons) or self._stat_failed

    def _fail(self, kind: str, reason: str) -> None:
        # One reason per kind of failure (the first failing run's wording), not one per run.
        if kind not in self._kinds:
            self._kinds.add(kind)
            self.reasons.append(reason)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Add one run's output of the reference and the candidate.

        A sequence output (a list of tensors, which may differ in shape) is compared element
        by element; the figures pool its elements."""
        self.runs += 1
        self._add(ref, cand)

    def _add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if isinstance(ref, list) or isinstance(cand, list):
            if not (isinstance(ref, list) and isinstance(cand, list)) or len(ref) != len(cand):
                self._fail("shape", "a sequence output differs in length from the reference's")
                self.max_abs = self.max_rel = math.inf
                return
            for r, c in zip(ref, cand, strict=True):
                self._add(r, c)
            return
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            self._fail(
                "shape", f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}"
            )
            self.max_abs = self.max_rel = math.inf
            return
        if ref.size == 0:
            return
        floating = np.issubdtype(ref.dtype, np.floating)
        if not floating and not np.array_equal(ref, cand):
            self._fail("exact", f"{ref.dtype} values differ (non-float outputs must match exactly)")
        if not (floating or np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
            return  # strings (StringConcat, ...): compared exactly above, no figures to add
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        finite_r = np.isfinite(r)
        finite_c = np.isfinite(c)
        mask = None
        if not (finite_r.all() and finite_c.all()):
            same_places = np.array_equal(finite_r, finite_c)
            if not same_places or not np.all(
                (r[~finite_r] == c[~finite_c]) | (np.isnan(r[~finite_r]) & np.isnan(c[~finite_c]))
            ):
                self._fail("non-finite", "non-finite values (NaN/inf) differ")
                self.max_abs = self.max_rel = math.inf
                return
            mask = finite_r
            r = np.where(mask, r, 0.0)
            c = np.where(mask, c, 0.0)
        diff = np.abs(c - r)
        count = int(mask.sum()) if mask is not None else diff.size
        run_max = float(diff.max())
        run_scale = float(np.abs(r).max())
        self.max_abs = max(self.max_abs, run_max)
        self.scale = max(self.scale, run_scale)
        self.max_rel = max(self.max_rel, run_max / max(run_scale, _TINY))
        self.elements += count
        self.sum_abs += float(diff.sum())
        self.sum_rc += float(np.dot(r.ravel(), c.ravel()))
        self.sum_rr += float(np.dot(r.ravel(), r.ravel()))
        self.sum_cc += float(np.dot(c.ravel(), c.ravel()))
        self.sum_dd += float(np.dot(diff.ravel(), diff.ravel()))
        if floating and _looks_like_classes(ref):
            agree = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
            self.argmax_match += int(agree.sum())
            self.argmax_total += agree.size
        if not floating:
            return
        value = self._run_stat(diff if mask is None else diff[mask], run_max, count)
        bound = self.atol + self.rtol * run_scale
        if value - bound > self._worst_excess:
            self._worst_excess = value - bound
            self.stat_value = value
            self.stat_bound = bound
        if not value <= bound:
            self._stat_failed = True

    def _stat_label(self) -> str:
        if self.error_stat == "quantile":
            return f"q{self.error_quantile:g}"
        return self.error_stat

    def _run_stat(self, errors: np.ndarray, run_max: float, count: int) -> float:
        if self.error_stat == "max" or count == 0:
            return run_max if count else 0.0
        if self.error_stat == "mean":
            return float(errors.sum()) / count
        if self.error_stat == "median":
            return float(np.median(errors))
        return float(np.quantile(errors, self.error_quantile))

    def cosine(self) -> float:
        """Cosine similarity of everything seen so far (1.0 when both are all zeros)."""
        if self.sum_rr == 0.0 and self.sum_cc == 0.0:
            return 1.0
        if self.sum_rr == 0.0 or self.sum_cc == 0.0:
            return 0.0
        value = self.sum_rc / math.sqrt(self.sum_rr * self.sum_cc)
        return float(min(1.0, max(-1.0, value)))

    def snr_db(self) -> float:
        """Signal-to-noise ratio in dB (inf when identical, -inf when the reference is zero)."""
        if self.sum_dd == 0.0:
            return math.inf
        if self.sum_rr == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sum_rr / self.sum_dd)

    def result(self) -> OutputParity:
        """The figures and the verdict."""
        reasons = list(self.reasons)
        if self._stat_failed:
            worst = " (the worst run)" if self.runs > 1 else ""
            reasons.append(
                f"{self._stat_label()} abs error {self.stat_value:.3g} > atol + rtol * max|ref| "
                f"= {self.stat_bound:.3g}{worst}"
            )
        cosine = self.cosine()
        if self.min_cosine is not None and math.isfinite(self.max_abs) and cosine < self.min_cosine:
            reasons.append(f"cosine {cosine:.6f} < min cosine {self.min_cosine:g}")
        if self.runs == 0:
            reasons.append("no runs")
        return OutputParity(
            name=self.name,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            ok=not reasons,
            mean_abs=self.sum_abs / self.elements if self.elements else 0.0,
            cosine=cosine,
            snr_db=self.snr_db(),
            argmax_agreement=(self.argmax_match / self.argmax_total if self.argmax_total else None),
            error_stat=self._stat_label(),
            error_stat_value=self.stat_value,
            bound=self.stat_bound,
            rtol=self.rtol,
            atol=self.atol,
            min_cosine=self.min_cosine,
            scale=self.scale,
            elements=self.elements,
            runs=self.runs,
            reason="; ".join(reasons) or None,
        )


def relative_error(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """`(max|cand - ref|, max|cand - ref| / max|ref|)` of one pair of arrays.

    Both are inf when the shapes differ or NaN/inf sit at different places. Float32/64
    arrays take a fast path in their own precision (the rounding of the difference is far
    below any error worth reporting); anything else goes through OutputStats.
    """
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if (
        ref.shape == cand.shape
        and ref.size
        and ref.dtype == cand.dtype
        and ref.dtype in (np.float32, np.float64)
    ):
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the slow path decides
            worst = float(np.max(np.abs(np.subtract(cand, ref))))
        scale = float(np.max(np.abs(ref)))
        if math.isfinite(worst) and math.isfinite(scale):
            return worst, worst / max(scale, _TINY)
    stats = OutputStats("")
    stats.update(ref, cand)
    return stats.max_abs, stats.max_rel


def ort_session(model: onnx.ModelProto | str | Path | bytes):
    """An ONNX Runtime CPU session with quiet logs (a path, serialized bytes or a ModelProto)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 0
    if isinstance(model, bytes):
        from onnxshrink.engine.io import apply_session_threads

        return ort.InferenceSession(
            model, apply_session_threads(options), providers=["CPUExecutionProvider"]
        )
    return inference_session(model, options, ["CPUExecutionProvider"])


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_NODE = re.compile(
    r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: "
)
# a C++ source location and function signature ("/src/x.h:91 onnxruntime::F(...)") and the
# assertion that failed ("a == b was false."): noise to the user, and what cut ORT's
# message off before the sentence that says what is wrong
_ORT_SOURCE = re.compile(r"\S+\.(?:h|cc|cpp|cu):\d+ (?:[\w:~<>]+\([^)]*\)\s*)?")
_ORT_ASSERT = re.compile(r"\s*[^.:]*? was false\.")


def ort_failure(exc: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's error message on one line, the part a user can act on first.

    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node.
    Name:'r' Status Message: /src/reshape_helper.h:91 onnxruntime::ReshapeHelper(...) a == b
    was false. The input tensor cannot be reshaped..." becomes "Reshape node 'r': The input
    tensor cannot be reshaped...": the code prefix, source location, C++ signature and failed
    assertion go, and the lines (ORT lists bad dims on lines of their own) are joined.
    """
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    text = _ORT_PREFIX.sub("", text)
    text = _ORT_NODE.sub(lambda m: f"{m[1]} node{f' {m[2]!r}' if m[2] else ''}: ", text)
    text = _ORT_SOURCE.sub("", text)
    text = _ORT_ASSERT.sub("", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def input_failure(
    session: Any, feed: dict[str, np.ndarray], exc: BaseException, given: bool = False
) -> str:
    """Why a model failed on `feed`, with the fix: "(x[8, 4]): <ORT's reason>; <hint>".

    A run of more than one sample on a model whose axis 0 is not fixed suggests `--batch 1`
    (a model may declare a dynamic batch and still take one sample: a Reshape to a fixed
    shape); otherwise, for generated inputs (`given` False), `--input-shape` or `--inputs`;
    for the user's own arrays, ORT's reason says what does not fit.
    """
    shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feed.items())
    fixed = {
        i.name: i.shape[0]
        for i in session.get_inputs()
        if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0
    }
    dynamic = {k: v for k, v in feed.items() if k not in fixed and np.ndim(v) >= 1 and len(v) > 1}
    if dynamic:
        rows = len(next(iter(dynamic.values())))
        hint = (
            f"a run of {rows} samples along axis 0; the model may take one sample per run: "
            "pass --batch 1"
        )
    elif not given:
        hint = "pass --input-shape or --inputs"
    else:
        return f"({shapes}): {ort_failure(exc)}"
    return f"({shapes}): {ort_failure(exc)}; {hint}"


def check_time_limit(time_limit: float | None) -> None:
    """Raise UsageError for a time limit that is not a number of seconds >= 0."""
    if time_limit is not None and not (0 <= time_limit < math.inf):
        raise UsageError(f"bad --time-limit {time_limit:g}: give seconds >= 0 (0: no limit)")


def run_with_limit(
    session: Any,
    names: list[str] | None,
    feed: dict[str, np.ndarray],
    time_limit: float | None,
    what: str,
) -> list[np.ndarray]:
    """`session.run(names, feed)`, stopped once it has run `time_limit` seconds (None, 0: never).

    A watchdog timer sets `terminate` on the run's `RunOptions`; ONNX Runtime checks it between
    kernels and on every Loop/Scan iteration, so a Loop that never ends stops too (a single
    kernel still runs to its end). The run then fails, and TimeLimitError says that `what`
    ("the original model on input 1") ran over. Other failures propagate as ORT raised them.
    """
    if not time_limit:
        return session.run(names, feed)
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # the "terminate flag" failure is ours to report
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        options.terminate = True

    timer = threading.Timer(time_limit, stop)
    timer.daemon = True
    timer.start()
    try:
        return session.run(names, feed, options)
    except Exception:
        if fired.is_set():
            raise TimeLimitError(
                f"parity run exceeded the time limit of {time_limit:g} s ({what}); "
                "--time-limit raises it, 0 removes it"
            ) from None
        raise
    finally:
        timer.cancel()


def _int_input_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs read by Gather (token ids), the table size along the gathered axis."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = list(attr.t.dims)
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = tables[node.input[0]]
        if dims:
            size = dims[axis]
            bounds[node.input[1]] = min(bounds.get(node.input[1], size), size)
    return bounds


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (initializers listed as inputs left out)."""
    initializer_names = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializer_names]


def generate_inputs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    batch: int = 1,
    ranges: dict[str | None, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """One feed of random inputs: floats in [0, 1), integers within safe ranges.

    Unknown dims: `batch` for axis 0, DEFAULT_DYNAMIC_DIM elsewhere, unless `input_shapes` pins
    them. Integer inputs that index an embedding table (through Gather) stay below its size;
    others are 0 or 1 (masks, type ids). `ranges` maps an input name (or None, for every
    input) to `(low, high)`: floats uniform in [low, high), integers in [low, high).
    Raises UsageError for an input that cannot be generated: not a tensor, a type numpy has
    no values for, or an array over `MAX_GENERATED_BYTES`.
    """
    rng = np.random.default_rng(seed)
    input_shapes = input_shapes or {}
    ranges = ranges or {}
    bounds = _int_input_bounds(model)
    feeds: dict[str, np.ndarray] = {}
    for value in model_inputs(model):
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UsageError(
                f"input {value.name!r} is a {kind or 'value of no type'}, not a tensor: "
                "onnxshrink cannot generate inputs for it (--no-verify skips the check)"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except (KeyError, ValueError):
            raise UsageError(
                f"input {value.name!r} has element type {tensor_type.elem_type}, which has no "
                "values to generate; pass --inputs"
            ) from None
        if value.name in input_shapes:
            shape = list(input_shapes[value.name])
        else:
            shape = [
                d.dim_value
                if d.HasField("dim_value") and d.dim_value > 0
                else (batch if i == 0 else DEFAULT_DYNAMIC_DIM)
                for i, d in enumerate(tensor_type.shape.dim)
            ]
        size = math.prod(shape) * dtype.itemsize
        if size > MAX_GENERATED_BYTES:
            raise UsageError(
                f"input {value.name!r}: a generated array of shape {shape} would take "
                f"{size / 2**30:.3g} GiB; pin its dims with --input-shape or pass --inputs"
            )
        span = ranges.get(value.name, ranges.get(None))
        if np.issubdtype(dtype, np.floating):
            low, high = span if span is not None else (0.0, 1.0)
            feeds[value.name] = rng.uniform(low, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.asarray(rng.random(shape) < 0.5)  # a 0-d array, not a scalar
        else:
            if span is not None:
                low, high = int(math.ceil(span[0])), int(math.ceil(span[1]))
                if value.name in bounds and high > bounds[value.name]:
                    logger.warning(
                        "input %s: range [%d, %d) goes past the embedding table size %d",
                        value.name,
                        low,
                        high,
                        bounds[value.name],
                    )
            else:
                low, high = 0, bounds.get(value.name, 2)
            feeds[value.name] = rng.integers(low, high, size=shape).astype(dtype)
    return feeds


def parse_input_ranges(
    specs: Iterable[str] | None, model: onnx.ModelProto | None = None
) -> dict[str | None, tuple[float, float]]:
    """Parse `NAME:LOW,HIGH` (or `LOW,HIGH` for every input); raise UsageError on a bad spec.

    With `model`, names must be model inputs, bool inputs take no range, and integer inputs
    need integer bounds.
    """
    ranges: dict[str | None, tuple[float, float]] = {}
    inputs = {v.name: v for v in model_inputs(model)} if model is not None else None
    for spec in specs or []:
        # The range itself may hold a colon-free negative number; split at the last colon.
        name, sep, text = spec.rpartition(":")
        key = name if sep else None
        example = "e.g. x:-1,1"
        parts = text.split(",")
        try:
            low, high = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            raise UsageError(f"bad --input-range {spec!r}: expected NAME:LOW,HIGH ({example})")
        if not low < high:
            raise UsageError(f"bad --input-range {spec!r}: LOW must be below HIGH")
        if inputs is not None and key is not None:
            if key not in inputs:
                raise UsageError(
                    f"bad --input-range {spec!r}: {key!r} is not a model input "
                    f"(inputs: {', '.join(inputs)})"
                )
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[key].type.tensor_type.elem_type)
            if dtype == np.bool_:
                raise UsageError(f"bad --input-range {spec!r}: {key!r} is a bool input")
            if not np.issubdtype(dtype, np.floating) and not (
                low.is_integer() and high.is_integer()
            ):
                raise UsageError(
                    f"bad --input-range {spec!r}: {key!r} is an integer input; bounds must be "
                    "integers"
                )
        ranges[key] = (low, high)
    return ranges


def load_inputs(path: str | Path, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Feeds from an .npz (one array per input) or a folder of .npz files, one file at a time."""
    for f in npz_files(path):
        try:
            data = np.load(f, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"--inputs {f}: not a readable .npz file ({exc})") from None
        with data:
            missing = [n for n in input_names if n not in data.files]
            if missing:
                raise UsageError(
                    f"--inputs {f}: no array for model input(s) {', '.join(missing)} "
                    f"(file has {', '.join(data.files) or 'nothing'})"
                )
            yield {n: np.asarray(data[n]) for n in input_names}


def npz_files(path: str | os.PathLike[str]) -> list[Path]:
    """The .npz file at `path`, or the sorted .npz files of a folder; UsageError when none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise UsageError(f"--inputs {p}: folder holds no .npz files")
        return files
    if p.is_file():
        return [p]
    raise UsageError(f"--inputs {p}: no such file or folder")


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an .npz from the headers alone (no data read); UsageError for a file
    that is not one, or holds object arrays (loading them needs pickle, which is never used)."""
    shapes: dict[str, tuple[int, ...]] = {}
    objects: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (
                        np.lib.format.read_array_header_1_0(f)
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0(f)
                    )
                name = info.filename[: -len(".npy")]
                if header[2].hasobject:  # would need pickle to load: never done for inputs
                    objects.append(name)
                shapes[name] = tuple(header[0])
    except Exception as exc:
        raise UsageError(f"--inputs {path}: not a readable .npz file ({exc})") from None
    if objects:
        raise UsageError(
            f"--inputs {path}: array(s) {', '.join(objects)} hold Python objects; "
            "give numeric arrays (np.savez of numpy arrays of numbers)"
        )
    return shapes


def _declared_batch(value: onnx.ValueInfoProto) -> tuple[int, int | None]:
    """(rank, fixed axis-0 size or None) as the model declares an input; rank -1 if unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return -1, None
    dims = tensor_type.shape.dim
    if not dims:
        return 0, None
    first = dims[0]
    return len(dims), (
        first.dim_value if first.HasField("dim_value") and first.dim_value >= 0 else None
    )


def batched_arrays(
    shapes: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, int | None]]
) -> list[str]:
    """The arrays that carry a batch axis: rank >= 1, and not declared a scalar by the model."""
    return [n for n, s in shapes.items() if len(s) >= 1 and declared.get(n, (-1, None))[0] != 0]


def plan_batches(
    shapes: dict[str, tuple[int, ...]],
    declared: dict[str, tuple[int, int | None]],
    batch: int | None = None,
    where: str = "--inputs",
    max_batch: int | None = None,
) -> list[tuple[int, int]] | None:
    """Slices `[start, stop)` along axis 0 for one file's arrays; None feeds the file whole.

    1. Scalars (and inputs the model declares as scalars) go to every run unchanged.
    2. The other arrays must share their axis-0 length N; if they do not (e.g. a recurrent
       state beside a batch of audio) the file is one run, and `batch` is refused.
    3. The batch size is the fixed axis-0 dim the model declares (all inputs that declare one
       must agree), else `batch`, else `min(N, max_batch)`, else N (one run). `max_batch` is
       how callers bound memory: a file of 1024 samples for a dynamic-batch model runs as
       128 batches of 8, not as one batch of 1024.
    4. A fixed batch size must divide N; with `batch` or `max_batch` the last run may be
       smaller.
    5. N = 0 is refused (nothing would run), unless the model declares that axis as 0 long:
       an empty tensor is then exactly what it takes, and the file is its one run. A declared
       0 with N > 0 counts as no fixed size (some exporters write 0 for a dynamic dim).
    """
    lengths = {n: shapes[n][0] for n in batched_arrays(shapes, declared)}
    if not lengths:
        return None
    if len(set(lengths.values())) > 1:
        if batch is not None:
            raise UsageError(
                f"{where}: cannot split into batches of {batch}: arrays differ in length along "
                f"axis 0 ({', '.join(f'{n}: {v}' for n, v in lengths.items())})"
            )
        return None
    total = next(iter(lengths.values()))
    fixed = {d for d in (declared.get(n, (-1, None))[1] for n in lengths) if d is not None}
    if total == 0 and fixed == {0}:
        return None  # case 5: the model takes an empty axis 0
    fixed.discard(0)
    if len(fixed) > 1:
        raise UsageError(
            f"{where}: the model's inputs declare different fixed batch sizes ({sorted(fixed)})"
        )
    if fixed:
        size = fixed.pop()
        if total % size:
            raise UsageError(
                f"{where}: {total} samples along axis 0 do not split into the model's fixed "
                f"batch of {size}"
            )
        if batch is not None and batch != size:
            raise UsageError(f"--batch {batch}: the model's batch size is fixed at {size}")
    elif batch is not None:
        size = batch
    else:
        size = min(total, max_batch) if max_batch else total
    if total == 0:  # an empty file would pass every check without running anything
        raise UsageError(f"{where}: 0 samples along axis 0; give at least one")
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def split_feed(
    feed: dict[str, np.ndarray],
    declared: dict[str, tuple[int, int | None]],
    max_batch: int | None,
    where: str = "--inputs",
) -> Iterator[dict[str, np.ndarray]]:
    """`feed` cut along axis 0 into runs of at most `max_batch` samples (`plan_batches`).

    `declared` is `declared_batches(model)`. A feed that cannot be split (arrays of different
    lengths, a fixed batch it already matches) comes back whole. The runs are views.
    """
    shapes = {n: tuple(np.shape(a)) for n, a in feed.items()}
    plan = plan_batches(shapes, declared, None, where, max_batch)
    if plan is None or len(plan) == 1:
        yield feed
        return
    sliced = set(batched_arrays(shapes, declared))
    for start, stop in plan:
        yield {n: (a[start:stop] if n in sliced else a) for n, a in feed.items()}


def check_batch(model: onnx.ModelProto, batch: int | None) -> None:
    """Raise UsageError for a `--batch` the model cannot take: below 1, or another size than
    the fixed axis-0 dim its inputs declare (`plan_batches`, 3)."""
    if batch is None:
        return
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    fixed = {size for _, size in declared_batches(model).values() if size}
    if fixed and batch not in fixed:
        raise UsageError(
            f"--batch {batch}: the model's batch size is fixed at "
            f"{', '.join(str(f) for f in sorted(fixed))}"
        )


def declared_batches(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """Input name -> (rank, fixed axis-0 size or None), as `plan_batches` takes them."""
    return {v.name: _declared_batch(v) for v in model_inputs(model)}


def feed_samples(feed: dict[str, np.ndarray], declared: dict[str, tuple[int, int | None]]) -> int:
    """Samples in a feed: axis-0 length of its first input that has a batch axis (else 1)."""
    for name in declared:
        value = feed.get(name)
        if value is not None and declared[name][0] != 0 and np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return 1


class InputBatches:
    """Feeds from an .npz file or a folder of them, split along axis 0 into runnable batches.

    Files are read one at a time; `total` (the number of runs) comes from the array headers
    before any data is read, so bad files are refused up front. See `plan_batches` for the
    splitting rules (`batch`, `max_batch`). Iterating again reads the files again.

    A file split into batches is streamed: each run's rows are read from the archive member
    when that run comes (`_stream_rows`), so memory holds one batch, not the file. An .npz
    written by `np.savez` stores its arrays uncompressed and reads at disk speed;
    `np.savez_compressed` files stream too, decompressed as they are read.
    """

    def __init__(
        self,
        path: str | Path,
        model: onnx.ModelProto,
        batch: int | None = None,
        *,
        max_batch: int | None = None,
        where: str = "--inputs",
    ):
        if batch is not None and batch < 1:
            raise UsageError(f"--batch {batch}: must be at least 1")
        inputs = model_inputs(model)
        self.names = [v.name for v in inputs]
        declared = declared_batches(model)
        self.files = npz_files(path)
        self.plans: list[list[tuple[int, int]] | None] = []
        self.sliced: list[set[str]] = []
        #: samples per file: axis-0 length of its batched arrays (1 when the file is one run)
        self.samples = 0
        for f in self.files:
            shapes = _npz_shapes(f)
            missing = [n for n in self.names if n not in shapes]
            if missing:
                raise UsageError(
                    f"{where} {f}: no array for model input(s) {', '.join(missing)} "
                    f"(file has {', '.join(shapes) or 'nothing'})"
                )
            extra = [n for n in shapes if n not in self.names]
            if extra:
                logger.info("%s: arrays %s are not model inputs; ignored", f, ", ".join(extra))
            shapes = {n: shapes[n] for n in self.names}
            plan = plan_batches(shapes, declared, batch, f"{where} {f}", max_batch)
            self.plans.append(plan)
            self.sliced.append(set(batched_arrays(shapes, declared)))
            self.samples += plan[-1][1] if plan else 1
        self.total = sum(1 if plan is None else len(plan) for plan in self.plans)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i, f in enumerate(self.files):
            plan, sliced = self.plans[i], self.sliced[i]
            if plan is None:
                yield next(load_inputs(f, self.names))
                continue
            logger.debug("%s: %d run(s) along axis 0", f, len(plan))
            yield from _stream_rows(f, self.names, plan, sliced)


def _stream_rows(
    path: Path, names: list[str], plan: list[tuple[int, int]], sliced: set[str]
) -> Iterator[dict[str, np.ndarray]]:
    """One feed per `[start, stop)` of `plan` (consecutive from 0), read as it is needed.

    Arrays in `sliced` are read row by row from their archive member; the others (scalars,
    and the rare Fortran-ordered array) are read whole once and go to every run (sliced ones
    sliced). Raises UsageError for a member that is shorter than its header says.
    """
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise UsageError(f"--inputs {path}: not a readable .npz file ({exc})") from None
    with archive:
        streams: dict[str, tuple[Any, tuple[int, ...], np.dtype]] = {}
        whole: dict[str, np.ndarray] = {}
        try:
            for name in names:
                member = archive.open(f"{name}.npy")
                version = np.lib.format.read_magic(member)
                shape, fortran, dtype = (
                    np.lib.format.read_array_header_1_0(member)
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0(member)
                )
                if name in sliced and not fortran and not dtype.hasobject and shape:
                    streams[name] = (member, tuple(shape), dtype)
                    continue
                member.close()
                with archive.open(f"{name}.npy") as again:
                    whole[name] = np.lib.format.read_array(again, allow_pickle=False)
            for start, stop in plan:
                feed: dict[str, np.ndarray] = {}
                for name in names:
                    if name in streams:
                        member, shape, dtype = streams[name]
                        rows = np.empty((stop - start, *shape[1:]), dtype=dtype)
                        view = rows.data.cast("B") if rows.nbytes else memoryview(b"")
                        done = 0
                        while done < rows.nbytes:
                            got = member.readinto(view[done:])
                            if not got:
                                raise ValueError(f"array {name!r} ends before row {stop}")
                            done += got
                        feed[name] = rows
                    elif name in sliced:
                        feed[name] = whole[name][start:stop]
                    else:
                        feed[name] = whole[name]
                yield feed
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"--inputs {path}: not a readable .npz file ({exc})") from None
        finally:
            for member, _, _ in streams.values():
                member.close()


class Reference:
    """The original model's session and outputs, reused when several candidates are checked.

    Outputs are cached per feed position while they fit in `cache_bytes`; past that they are
    recomputed, so a long stream of inputs never piles up in memory.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, cache_bytes: int = 256 * 2**20):
        self.model = model
        self.cache_bytes = cache_bytes
        self._session = None
        self._names: list[str] | None = None
        self._cache: dict[int, list[np.ndarray]] = {}
        self._cached = 0

    @property
    def session(self):
        """The ORT session, created on first use (raises what ORT raises)."""
        if self._session is None:
            self._session = ort_session(self.model)
        return self._session

    @property
    def output_names(self) -> list[str]:
        """The model's output names (from its session, which this creates if needed)."""
        if self._names is None:
            self._names = [o.name for o in self.session.get_outputs()]
        return self._names

    def prime(
        self, feeds: Iterable[dict[str, np.ndarray]], time_limit: float | None = None
    ) -> bool:
        """Run every feed now and close the session, when all the outputs fit the cache.

        For a large model: its session then never coexists with the candidate's, which would
        hold the weights twice. Returns whether every output was kept; a run that fails
        stops here (the parity check then meets the failure and reports it), except a run past
        `time_limit` seconds, which raises TimeLimitError (`run_with_limit`).
        """
        try:
            self.output_names  # noqa: B018 (creates the session and keeps the names)
            for index, feed in enumerate(feeds):
                self.run(index, feed, time_limit)
                if index not in self._cache:
                    return False
        except TimeLimitError:
            raise
        except Exception:
            return False
        self._session = None
        return True

    def run(
        self,
        index: int,
        feed: dict[str, np.ndarray],
        time_limit: float | None = None,
        label: str = "original",
    ) -> list[np.ndarray]:
        """Outputs for the feed at position `index` of the stream (`run_with_limit`)."""
        if index in self._cache:
            return self._cache[index]
        outputs = run_with_limit(
            self.session, None, feed, time_limit, f"the {label} model on input {index + 1}"
        )
        size = sum(_nbytes(o) for o in outputs)
        if self._cached + size <= self.cache_bytes:
            self._cache[index] = outputs
            self._cached += size
        return outputs


def _nbytes(output: Any) -> int:
    """Bytes of one output: a tensor, a sequence of them (a list) or an empty optional."""
    if isinstance(output, list):
        return sum(_nbytes(o) for o in output)
    return 0 if output is None else int(np.asarray(output).nbytes)


def check_parity(
    reference: Reference | onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    feeds: Iterable[dict[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    stop_on_failure: bool = False,
    *,
    criteria: Criteria | None = None,
    progress: Progress | None = None,
    total: int | None = None,
    labels: tuple[str, str] = ("original", "optimized"),
    observe: Callable[[dict[str, np.ndarray], list[str], list[np.ndarray], list[np.ndarray]], None]
    | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    inputs_given: bool = False,
) -> ParityReport:
    """Run both models on every feed and compare each output; never raises for ORT failures
    but one: a run longer than `time_limit` seconds raises TimeLimitError (`run_with_limit`).

    Pass a `Reference` to reuse the original's session and outputs across candidates; the feeds
    must then come in the same order each time. `stop_on_failure` ends at the first feed on
    which an output fails (the report then covers the feeds seen so far). `criteria` replaces
    `rtol`/`atol` with the full set of checks (module docstring); outputs are matched by name.
    `progress(done, total)` is called after each run (`total` 0 when unknown). `labels` name
    the two models in the reasons (e.g. "reference", "candidate"). `observe(feed, names,
    ref, cand)` sees every run's feed and outputs of both models (for figures of its own).
    `inputs_given`: the feeds are the user's arrays, so a failure on them does not suggest
    passing --inputs.
    """
    ref_label, cand_label = labels
    criteria = criteria if criteria is not None else Criteria(rtol=rtol, atol=atol)
    rtol, atol = criteria.rtol, criteria.atol
    if total is None:
        total = len(feeds) if hasattr(feeds, "__len__") else 0  # type: ignore[arg-type]

    def failed(verified: bool, reason: str, samples: int = 0) -> ParityReport:
        return ParityReport(verified, False, rtol, atol, samples, reason=reason, criteria=criteria)

    ref = reference if isinstance(reference, Reference) else Reference(reference, cache_bytes=0)
    try:
        names = ref.output_names
    except Exception as exc:
        return failed(False, f"ONNX Runtime cannot load the {ref_label} model: {first_line(exc)}")
    try:
        cand_sess = ort_session(candidate)
    except Exception as exc:
        return failed(False, f"ONNX Runtime cannot load the {cand_label} model: {first_line(exc)}")
    cand_names = [o.name for o in cand_sess.get_outputs()]
    if set(names) != set(cand_names):
        only_ref = [n for n in names if n not in cand_names]
        only_cand = [n for n in cand_names if n not in names]
        return failed(
            True,
            "output names differ"
            + (f"; only the {ref_label} has {', '.join(only_ref)}" if only_ref else "")
            + (f"; only the {cand_label} has {', '.join(only_cand)}" if only_cand else ""),
        )
    stats = {n: criteria.stats_for(n) for n in names}
    # an input's rank as the candidate declares it: axis 0 counts samples unless it is a scalar
    declared: dict[str, tuple[int, int | None]] = {
        i.name: (len(i.shape or ()), None) for i in cand_sess.get_inputs()
    }
    samples = rows = 0
    for index, feed in enumerate(feeds):
        try:
            ref_out = ref.run(index, feed, time_limit, ref_label)
        except TimeLimitError:
            raise
        except Exception as exc:
            return failed(
                False,
                f"the {ref_label} model fails on the inputs "
                f"{input_failure(ref.session, feed, exc, inputs_given)}",
                samples,
            )
        try:
            cand_out = run_with_limit(
                cand_sess, names, feed, time_limit, f"the {cand_label} model on input {index + 1}"
            )
        except TimeLimitError:
            raise
        except Exception as exc:
            return failed(
                True,
                f"the {cand_label} model fails where the {ref_label} runs: {ort_failure(exc)}",
                samples,
            )
        samples += 1
        rows += feed_samples(feed, declared)
        for name, r, c in zip(names, ref_out, cand_out, strict=True):
            stats[name].update(r, c)
        if observe is not None:
            observe(feed, names, ref_out, cand_out)
        del ref_out, cand_out
        if progress is not None:
            progress(samples, total)  # total 0: unknown
        if stop_on_failure and any(s.failing for s in stats.values()):
            break
    if samples == 0:
        return failed(False, "no inputs to compare on")
    outputs = [stats[n].result() for n in names]
    return ParityReport(
        True, all(o.ok for o in outputs), rtol, atol, samples, outputs, criteria=criteria, rows=rows
    )


def compare_outputs(
    name: str, ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float = DEFAULT_ATOL
) -> OutputParity:
    """All figures and the verdict for one output of one run (see the module docstring)."""
    stats = OutputStats(name, rtol, atol)
    stats.update(ref, cand)
    return stats.result()


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars made plain and inf/NaN spelled as strings (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return value


@dataclass
class ParityInputs:
    """What a parity run compares on: `feeds()` iterates the feeds (again on every call, so
    localization can rerun them), `total` counts them, `info` describes them (the `inputs`
    entry of `onnxshrink parity --json`)."""

    feeds: Callable[[], Iterator[dict[str, np.ndarray]]]
    total: int
    info: dict[str, Any]


def parity_inputs(
    reference: onnx.ModelProto,
    inputs: str | os.PathLike[str] | Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    batch: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_ranges: Mapping[str | None, tuple[float, float]] | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> ParityInputs:
    """The feeds of a parity run against `reference`, as `onnxshrink parity` chooses them.

    `inputs`: an .npz or a folder of them (split along axis 0 into runs the model accepts, at
    most `batch` samples each: `InputBatches`), or a list of feed dicts (one run each, as
    given). Without `inputs`, `samples` generated feeds (default DEFAULT_GENERATED_SAMPLES)
    from `seed`, `seed + 1`, ...: `input_shapes` pins dims, `input_ranges` maps an input name
    (None: every input) to `(low, high)`, `batch` sets a dynamic axis 0 (`generate_inputs`).
    Raises UsageError for settings that contradict each other or do not fit the model.
    """
    input_names = [v.name for v in model_inputs(reference)]
    generated_only = [
        flag
        for flag, given in (
            ("--input-shape", bool(input_shapes)),
            ("--input-range", bool(input_ranges)),
            ("--samples", samples is not None),
        )
        if given
    ]
    if inputs is not None and generated_only:
        raise UsageError(
            f"{', '.join(generated_only)} shape generated inputs; --inputs gives the "
            "arrays themselves (drop one or the other)"
        )
    if isinstance(inputs, (str, os.PathLike)):
        batches = InputBatches(Path(inputs), reference, batch, max_batch=DEFAULT_BATCH)
        return ParityInputs(
            lambda: iter(batches),
            batches.total,
            {
                "source": str(inputs),
                "files": len(batches.files),
                "runs": batches.total,
                "samples": batches.samples,
                "batch": batch,
            },
        )
    if inputs is not None:
        feeds = [dict(feed) for feed in inputs]
        if batch is not None:
            raise UsageError("--batch splits .npz files; a list of feeds runs as given")
        return ParityInputs(
            lambda: iter(feeds), len(feeds), {"source": "feeds", "runs": len(feeds)}
        )
    shapes = {name: list(dims) for name, dims in (input_shapes or {}).items()}
    unknown = [n for n in shapes if n not in input_names]
    if unknown:
        raise UsageError(
            f"bad --input-shape: {', '.join(unknown)} is not a model input "
            f"(inputs: {', '.join(input_names)})"
        )
    # Ranges go through the command line's parser, which checks them against the model.
    ranges = parse_input_ranges(
        [
            f"{'' if k is None else k + ':'}{float(lo)!r},{float(hi)!r}"
            for k, (lo, hi) in (input_ranges or {}).items()
        ],
        reference,
    )
    count = samples if samples is not None else DEFAULT_GENERATED_SAMPLES
    if count < 1:
        raise UsageError(f"--samples {count}: must be at least 1")
    return ParityInputs(
        lambda: (
            generate_inputs(reference, shapes, seed + i, batch or 1, ranges) for i in range(count)
        ),
        count,
        {
            "source": "generated",
            "runs": count,
            "seed": seed,
            "batch": batch or 1,
            "input_shapes": shapes,
            "input_ranges": {("*" if k is None else k): list(v) for k, v in ranges.items()},
        },
    )


def parity(
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    min_cosine: float | None = None,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    error_stat: str = "max",
    error_quantile: float = DEFAULT_ERROR_QUANTILE,
    batch: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_ranges: Mapping[str | None, tuple[float, float]] | None = None,
    samples: int | None = None,
    seed: int = 0,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    localize: bool | None = False,
    localize_samples: int = 2,
    progress: Progress | None = None,
) -> ParityReport:
    """Compare `candidate`'s outputs with `reference`'s: `onnxshrink parity` from Python.

    The models are paths or ModelProtos (never modified); `inputs` and the input settings are
    `parity_inputs`'s. An output passes under `rtol`, `atol`, `min_cosine` and `error_stat`
    (with `error_quantile`) as the module docstring says (7-10); `tolerances` overrides them per
    output, e.g. `{"logits": {"atol": 1e-3}}`. `localize=True` also ranks the candidate's nodes
    by the error they add, on the first `localize_samples` feeds (`report.localization`); None
    does that only when an output fails, as the command does.

    Returns the report: `passed` says whether every output passed, `verified` False (with
    `reason`) that the models could not be compared at all. It raises only for what the
    command exits 2 on (ModelLoadError for a missing or invalid model, UsageError for bad
    settings), for TimeLimitError (a run longer than `time_limit` seconds) and for
    OnnxRuntimeMissingError.
    """
    require_onnxruntime()
    check_time_limit(time_limit)
    overrides: dict[str, dict[str, float]] = {}
    for output, values in (tolerances or {}).items():
        bad = [k for k in values if k not in ("rtol", "atol", "min_cosine")]
        if bad:
            raise UsageError(
                f"tolerances[{output!r}]: unknown key(s) {', '.join(bad)} "
                "(expected rtol, atol, min_cosine)"
            )
        overrides[output] = {k: float(v) for k, v in values.items()}
    criteria = Criteria(rtol, atol, min_cosine, error_stat, error_quantile, overrides)
    ref_model = reference if isinstance(reference, onnx.ModelProto) else load_model(reference)
    cand_model = candidate if isinstance(candidate, onnx.ModelProto) else load_model(candidate)
    criteria.check_outputs(o.name for o in ref_model.graph.output)
    feeds = parity_inputs(
        ref_model,
        inputs,
        batch=batch,
        input_shapes=input_shapes,
        input_ranges=input_ranges,
        samples=samples,
        seed=seed,
    )
    # ONNX Runtime reads a model given as a path from its file (external data included).
    report = check_parity(
        ref_model if isinstance(reference, onnx.ModelProto) else Path(reference),
        cand_model if isinstance(candidate, onnx.ModelProto) else Path(candidate),
        feeds.feeds(),
        criteria=criteria,
        progress=progress,
        total=feeds.total,
        labels=("reference", "candidate"),
        time_limit=time_limit,
    )
    failed = report.verified and not report.passed and bool(report.outputs)
    if report.verified and (localize or (localize is None and failed)):
        from onnxshrink.verify.localize import localize as run_localize

        report.localization = run_localize(
            ref_model, cand_model, feeds.feeds(), localize_samples, time_limit=time_limit
        )
    return report
