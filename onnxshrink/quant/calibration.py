"""Calibration for static quantization: where the data comes from, and the ranges it gives.

Calibration runs the float model on sample inputs and records, per tensor to be quantized, the
range `[lo, hi]` that the int8 grid will cover. Collecting statistics is kept apart from
computing parameters (after torch.ao's observers): an `Observer` takes arrays one at a time
(`update`), keeps bounded state, and answers `range()` and `qparams()`.

Data sources (`calibration_feeds`):

1. An `.npz` file with one array per model input, axis 0 the sample axis, split into runs of
   at most `max_batch` samples (`DEFAULT_BATCH`, 8; the model's fixed batch when it declares
   one: `onnxshrink.verify.parity.plan_batches`) and streamed: each run's rows are read from the
   file when it comes, so memory holds one run whatever the file holds.
2. A folder of such files, read one file at a time.
3. A data-loader script, `loader.py` or `loader.py:function` (as Polygraphy's
   `--data-loader-script`): the function (default `load_data`) returns an iterable of feed
   dicts; every feed is checked against the model's inputs (names, dtypes, ranks), and a feed
   of more than `max_batch` samples is cut into runs of `max_batch` like an .npz.
4. The literal `random`: uniform inputs from `generate_inputs`, with a warning, since noise
   calibrates poorly.

Observers. Every range satisfies `lo <= 0 <= hi`, so that 0 is exactly representable.

5. `MinMaxObserver`: `lo = min(0, min x)`, `hi = max(0, max x)` over everything seen.
6. `HistogramObserver`: a signed histogram of `2B` bins over `[-a, a]` (bin width `w = a/B`,
   0 on a bin edge, so the |x| histogram is the two halves folded: `h[k] = pos[k] + neg[k]`,
   bin k covering `[k w, (k+1) w)`). The first bound is the least power of two above the
   first reach (strictly above, so no value sits on the bound); when a batch reaches `a` or
   past it, the range doubles `m` times (`a' = 2^m a`, the least that covers the batch), so
   bounds stay powers of two; every new bin is then exactly `2^m` old bins, so the old counts
   merge by summing groups (no interpolation, no smearing). The bin of x is `floor(x B / a) +
   B`, and `B / a` being a power of two, `x B / a` and its floor are exact: the result equals
   the histogram of all data binned at once on the final edges, exactly. The state is `2B`
   counts plus the running min/max:
   constant in the number of samples. The range is at most 2x wider than the data, so at
   least `B/2` bins cover |x|. A tensor of more than `2 HIST_SAMPLE` (65,536) elements is
   binned from a systematic sample, every s-th element (s odd, about size / 32,768) from an
   offset set by the run's index (`update(array, key)`), so that successive feeds see other
   positions, and a run is sampled alike whichever worker sees it (14); min and
   max stay exact (every element). This keeps the pass within a few times plain inference: on
   ppocr-v4-rec (64 feeds, 66 tensors) it took the percentile statistics from 1.68 s to
   1.12 s, with every range within 2.7% of the full histogram's (median difference 0).
   From the histogram, a threshold `t` on |x| is chosen; the range is then
   `(max(min x, -t), min(max x, t))`. Methods:
   a. `percentile` (p, e.g. 99.999): symmetric, `t` is the p-th percentile of |x|; asymmetric,
      `lo`/`hi` are the (100-p)-th/p-th percentiles of x. Within a bin, the CDF is interpolated
      linearly (values uniform within a bin), so the error is below one bin width.
   b. `entropy` (TensorRT's KL calibration): for each candidate `t = i w` (i = L..B, with L
      the number of levels), the reference P is `h[:i]` with the clipped tail `sum h[i:]` added
      to its last bin; Q spreads `h[:i]` into L groups (bin edges `floor(j i / L)`), each group's
      count shared evenly among its bins where P is non-zero. Choose the i with the least
      `KL(P || Q) = sum p log(p / q)` (p, q normalized). All candidates at once in closed form,
      with cumulative sums S (counts), N (non-zero bins) and E (`h log h`):
      `KL = (1/T) [sum_k P_k log P_k - sum_g P_g log(G_g / n_g)] - log T + log S[i]`,
      where T is the total count, `G_g` the group's count in h, `P_g` in P, `n_g` its
      non-zero bins. A group holding P mass but no h mass (only the last, from the folded
      tail) gives KL = inf. L = 128 (int8: 127 steps a side), 256 for data that is never
      negative (uint8 over [0, t]).
   c. `mse`: choose `t` minimizing the expected squared error of fake quantization with step
      `s = t / L'` (L' = 127 steps for signed data, 255 for non-negative data):
      `E(t) = sum_{k < i} h_k r_k(s) + sum_{k >= i} h_k ((c_k - t)^2 + w^2/12)`, with c_k the
      bin centre; the rounding error of a bin is `(c_k - s round(c_k / s))^2 + w^2/12` where
      `s >= w`, and `s^2/12` (uniform noise) where the step is finer than a bin. Candidates are
      bin edges, subsampled to at most 512, evaluated in blocks to bound memory.

Quantization parameters (`Observer.qparams`), from `(lo, hi)`:

7. Asymmetric: `scale = (hi - lo) / 255`, `zero_point = round(qmin - lo / scale)` clipped to
   `[qmin, qmax]` (uint8 [0, 255], int8 [-128, 127]); real 0 maps to the integer zero_point.
8. Symmetric: `t = max(-lo, hi)`; int8: `scale = t / 127`, zero_point 0 (the grid [-127, 127]
   as TensorRT uses); uint8: `scale = 2 t / 255`, zero_point 128.
9. A range of width 0 (a tensor that is always 0) gets scale 1. Scales are rounded to float32,
   the type ONNX stores them in.

Collecting (`collect_ranges`):

10. One ORT session on a copy of the model whose outputs are the requested intermediate
    tensors (main graph only); one run per feed; each array goes to its tensor's observer and
    is dropped. Graph inputs are observed from the feeds, initializers once from their values.
    Histograms grow as ranges grow, so every method needs a single pass over the data.
11. `collect_statistics` also keeps, for the tensors asked, a `ChannelMeanObserver`: a float64
    sum per channel and a count, updated from the same arrays in the same pass (what bias
    correction needs: `onnxshrink.rules.qdq`, case 7).
12. With `on_run`, the session also fetches the model's own graph outputs, and hands each feed
    and its outputs to the hook: the error budget (`onnxshrink.quant.sensitivity.ErrorReference`)
    keeps the first few as its reference instead of running the float model a second time.
13. `channel_ranges` keeps, per tensor asked, the min and max of every channel of the last
    axis (`ChannelRangeObserver`): what activation smoothing needs (`onnxshrink.rules.int8`), and
    what gives the range of a smoothed tensor `x / s` without a second pass:
    `[min_c lo_c / s_c, max_c hi_c / s_c]`.

Data-parallel calibration (`workers`, `optimize --calibration-workers N`, issue 13):

14. The runs are cut into N contiguous shards; each is observed in a worker process (forked
    where that is safe, else spawned: `onnxshrink.quant.fanout`, 5) with its own ORT session
    (made there: sessions do not pickle) on `CPUs / N` intra-op threads (ORT ignores
    OMP_NUM_THREADS). An .npz source is re-read by each worker, its own runs only;
    other sources (a loader, `random`, feed lists) are read in the parent and their arrays
    sent. The observers then merge, in shard order, into exactly what one pass gives:
    min/max and per-channel ranges trivially; histograms by regrouping the finer to the
    coarser power-of-two bound and adding counts (6); per-channel means from exact sums
    (float64 run sums added as integers at a common power-of-two scale, so the order of
    addition cannot change the last bit). Ranges, means and per-channel ranges with N
    workers are identical (==) to one process's. The `on_run` hook's runs come back from the
    first shard (only as many as `on_run_samples` asks), in run order.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxshrink.engine.io import (
    array_of,
    available_cpus,
    inference_session,
    outputs_added,
    write_model_files,
)
from onnxshrink.engine.shapes import infer_shapes
from onnxshrink.errors import OnnxShrinkError, UsageError, first_line
from onnxshrink.quant.fanout import check_workers, start_method
from onnxshrink.quant.schemes import Scheme
from onnxshrink.verify.parity import DEFAULT_BATCH as PARITY_DEFAULT_BATCH
from onnxshrink.verify.parity import (
    InputBatches,
    declared_batches,
    feed_samples,
    generate_inputs,
    model_inputs,
    split_feed,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Feed = dict[str, np.ndarray]
#: on_run(feed, the model's graph outputs on it), after each calibration run
RunHook = Callable[[Feed, list[np.ndarray]], None]

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.999
DEFAULT_BINS = 2048
RANDOM_SAMPLES = 16
#: samples per calibration run when the model's batch dim is dynamic (docstring, 1): the
#: statistics pass, bias correction and every budget session run batches of at most this,
#: so memory does not depend on how many samples a file holds; the same default as every
#: command's --batch (`onnxshrink.verify.parity.DEFAULT_BATCH`)
DEFAULT_BATCH = PARITY_DEFAULT_BATCH
RANDOM_SEED_BASE = 1_000_003
_MSE_CANDIDATES = 512
_MSE_BLOCK = 64
_HIST_BLOCK = 1 << 16
#: a tensor with more than twice this many elements is histogrammed on a sample (docstring 6)
HIST_SAMPLE = 1 << 15
_HOW_TO = (
    "pass --calibration-data with an .npz file (one array per model input, N samples along "
    "axis 0), "
    "a folder of .npz files, a loader script loader.py[:function] returning feed dicts, or "
    "'random' (synthetic inputs; poor ranges)"
)

# --------------------------------------------------------------------------------------------
# Data sources (module docstring, 1-4)


@dataclass(frozen=True)
class NpzSource:
    """What `calibration_feeds` needs to read an .npz source again, in another process."""

    path: str
    batch: int | None
    max_batch: int


@dataclass
class CalibrationData:
    """Feeds for calibration; iterate it (again and again) for dicts of input name -> array.

    `total` is the number of feeds (runs) when known up front (0 otherwise), `samples` the
    number of samples they hold (0 when unknown); `synthetic` is True for `random`, so that
    the caller can say in its output that the ranges come from noise.
    """

    source: str
    make: Callable[[], Iterator[Feed]]
    total: int = 0
    synthetic: bool = False
    samples: int = 0
    #: how a worker process reads these runs itself (an .npz file or folder); None: the
    #: feeds are read here and their arrays sent (docstring 14)
    npz: NpzSource | None = None

    def __iter__(self) -> Iterator[Feed]:
        return self.make()

    def __len__(self) -> int:
        return self.total


def calibration_feeds(
    spec: str | Path,
    model: onnx.ModelProto,
    batch: int | None = None,
    *,
    random_samples: int = RANDOM_SAMPLES,
    max_batch: int = DEFAULT_BATCH,
) -> CalibrationData:
    """Calibration feeds from `spec`: an .npz, a folder of them, `loader.py[:function]`, `random`.

    Each iteration reads the source again (files one at a time and row by row, the loader
    called anew), so memory does not grow with the number of samples. `batch` splits .npz
    arrays along axis 0 into runs of exactly that size; otherwise runs hold at most
    `max_batch` samples (module docstring, 1 and 3). Raises UsageError with one line saying
    what is wrong and how to provide calibration data.
    """
    if max_batch < 1:
        raise UsageError(f"--calibration-batch {max_batch}: must be at least 1")
    text = str(spec).strip()
    if not text:
        raise UsageError(f"no calibration data: {_HOW_TO}")
    if text == "random":
        logger.warning(
            "calibrating on random inputs: ranges will not match real data; "
            "pass real samples with --calibration-data"
        )

        def make_random() -> Iterator[Feed]:
            for i in range(random_samples):
                # seeds far from the ones `optimize` generates parity inputs with (0, 1, ...),
                # so that its check of the quantized model is not on the calibration samples
                yield generate_inputs(model, seed=RANDOM_SEED_BASE + i, batch=batch or 1)

        return CalibrationData(
            "random", make_random, random_samples, synthetic=True, samples=random_samples
        )
    script, function = _loader_spec(text)
    if script is not None:
        return _loader_data(script, function, model, max_batch)
    path = Path(text)
    if not path.exists():
        raise UsageError(f"--calibration-data {text}: no such file or folder; {_HOW_TO}")
    if path.is_file() and path.suffix != ".npz":
        raise UsageError(f"--calibration-data {text}: not an .npz file or loader script; {_HOW_TO}")
    try:
        batches = InputBatches(path, model, batch, max_batch=max_batch, where="--calibration-data")
    except UsageError as exc:
        raise UsageError(_as_calibration_message(exc)) from None

    def make_npz() -> Iterator[Feed]:
        try:
            yield from batches
        except UsageError as exc:
            raise UsageError(_as_calibration_message(exc)) from None

    return CalibrationData(
        str(path),
        make_npz,
        len(batches),
        samples=batches.samples,
        npz=NpzSource(str(path), batch, max_batch),
    )


def _as_calibration_message(exc: UsageError) -> str:
    # parity's readers name the option they serve; here the data came from --calibration-data.
    return str(exc).replace("--inputs", "--calibration-data", 1)


def _loader_spec(text: str) -> tuple[Path | None, str]:
    """(script, function) when `text` names a Python loader, else (None, "")."""
    if text.endswith(".py"):
        return Path(text), "load_data"
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py"):
        if not tail.isidentifier():
            raise UsageError(f"--calibration-data {text}: {tail!r} is not a function name")
        return Path(head), tail
    return None, ""


def _loader_data(
    script: Path, function: str, model: onnx.ModelProto, max_batch: int = DEFAULT_BATCH
) -> CalibrationData:
    where = f"--calibration-data {script}"
    if not script.is_file():
        raise UsageError(f"{where}: no such loader script")
    module_name = f"_onnxshrink_calibration_loader_{abs(hash(str(script.resolve())))}"
    # The script may import modules beside it (its own dataset or tokenizer helpers), as it
    # could when run as `python loader.py`: its folder goes first on sys.path, and stays there,
    # since the loader function may import lazily while it yields.
    folder = str(script.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, script)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not importable as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"{where}: cannot import the script: {first_line(exc)}") from None
    loader = getattr(module, function, None)
    if not callable(loader):
        defined = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise UsageError(
            f"{where}: defines no function {function!r} "
            f"(functions: {', '.join(defined) or 'none'}); use {script}:NAME to pick one"
        )
    expected = {
        v.name: (
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
            len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else -1,
        )
        for v in model_inputs(model)
    }
    declared = declared_batches(model)

    def make_loader() -> Iterator[Feed]:
        try:
            produced = loader()
            items = iter(produced)
        except Exception as exc:
            raise UsageError(f"{where}: {function}() failed: {first_line(exc)}") from None
        count = 0
        while True:
            try:
                feed = next(items)
            except StopIteration:
                break
            except Exception as exc:
                raise UsageError(
                    f"{where}: {function}() failed at feed {count}: {first_line(exc)}"
                ) from None
            checked = _checked_feed(feed, expected, f"{where}: feed {count}")
            try:
                yield from split_feed(checked, declared, max_batch, f"{where}: feed {count}")
            except UsageError:  # arrays the model cannot split: the feed runs as it is
                yield checked
            count += 1
        if count == 0:
            raise UsageError(f"{where}: {function}() yielded no feeds")

    return CalibrationData(f"{script}:{function}", make_loader)


def _checked_feed(feed: Any, expected: dict[str, tuple[np.dtype, int]], where: str) -> Feed:
    """The feed as arrays, or UsageError naming the first mismatch with the model's inputs."""
    if not isinstance(feed, Mapping):
        raise UsageError(
            f"{where}: expected a dict of input name -> array, got {type(feed).__name__}"
        )
    unknown = [str(k) for k in feed if k not in expected]
    if unknown:
        raise UsageError(
            f"{where}: {', '.join(repr(k) for k in unknown)} not a model input "
            f"(inputs: {', '.join(expected)})"
        )
    missing = [n for n in expected if n not in feed]
    if missing:
        raise UsageError(f"{where}: no value for model input(s) {', '.join(missing)}")
    out: Feed = {}
    for name, (dtype, rank) in expected.items():
        value = np.asarray(feed[name])
        if value.dtype != dtype:
            raise UsageError(f"{where}: input {name!r} is {value.dtype}, the model takes {dtype}")
        if rank >= 0 and value.ndim != rank:
            raise UsageError(
                f"{where}: input {name!r} has rank {value.ndim}, the model takes rank {rank}"
            )
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Observers (module docstring, 5-9)


class Observer:
    """Streaming statistics of one tensor: `update(array)` per batch, then `range()`/`qparams()`.

    State is bounded (independent of how many arrays were seen). `range()` raises ValueError
    when nothing was observed (a programming error, not a user's).
    """

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, array: np.ndarray, key: int | None = None) -> None:
        """Fold one array into the statistics; NaN/inf values are ignored.

        `key` names the sample the array comes from (the calibration run's global index + 1,
        0 for an initializer): an observer that samples a large tensor picks its positions
        from it, so the same run is sampled the same way whichever worker sees it (module
        docstring 6, 14). Without a key, the observer counts its own updates.
        """
        x = np.asarray(array)
        if x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += x.size
        self._update(x, lo, hi, key)

    def _update(self, x: np.ndarray, lo: float, hi: float, key: int | None) -> None:
        """Subclasses fold `x` (finite, with its min and max) into their state."""

    def merge(self, other: Observer) -> None:
        """Fold in what `other` (the same kind, built alike) observed on other data: the result
        is what one observer seeing both data would hold (module docstring 14)."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count

    def range(self) -> tuple[float, float]:
        """The clipping range (lo, hi), lo <= 0 <= hi."""
        self._check_seen()
        return min(self.min, 0.0), max(self.max, 0.0)

    def _check_seen(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no values observed")

    def qparams(self, dtype: str | Scheme = "uint8", symmetric: bool = False) -> tuple[float, int]:
        """(scale, zero_point) for the range, on a `Scheme`'s grid or a `uint8`/`int8` one
        (module docstring 7-9): the scheme's `qparams` is the one place for this algebra."""
        if isinstance(dtype, Scheme):
            return dtype.qparams(*self.range())
        return qparams_for_range(*self.range(), dtype=dtype, symmetric=symmetric)

    @property
    def nbytes(self) -> int:
        """Bytes of state held, containers counted item by item: what must stay constant."""
        return sum(_state_bytes(value) for value in vars(self).values())


def _state_bytes(value: object) -> int:
    """Bytes an observer's attribute holds: arrays by their buffer, containers by their items
    (so that a list that grows with every update shows), anything else 8."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(_state_bytes(k) + _state_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(_state_bytes(v) for v in value)
    return 8


class ChannelMeanObserver:
    """Streaming mean of a tensor per channel along `axis` (for bias correction).

    State is one exact sum per channel (Python integers at a common power-of-two scale) and a
    count: every run's float64 channel sums are added without rounding, so the mean does not
    depend on the order or grouping of the runs, and shards merge exactly (docstring 14).
    `update` accepts any array whose `axis` has the same length every time (a length change
    is a programming error: ValueError).
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        #: the exact sum is `sum * 2**scale` (an object array of Python ints)
        self.sum: np.ndarray | None = None
        self.scale = 0
        self.count = 0

    def update(self, array: np.ndarray, key: int | None = None) -> None:
        """Fold one array in (`key` is accepted for the observers' common interface)."""
        x = np.asarray(array)
        if x.ndim == 0 or x.size == 0:
            return
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"no axis {self.axis} in a {x.ndim}-d tensor")
        axis = self.axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != axis)
        total = x.sum(axis=others, dtype=np.float64)  # float64 accumulation, no float64 copy
        if not np.all(np.isfinite(total)):  # rare: count non-finite values as 0
            total = np.where(np.isfinite(x), x, 0).sum(axis=others, dtype=np.float64)
        if self.sum is not None and self.sum.shape != total.shape:
            raise ValueError(f"channel count changed: {self.sum.shape[0]} -> {total.shape[0]}")
        self._add(*_exact_integers(total))
        self.count += x.size // x.shape[axis]

    def _add(self, values: np.ndarray, scale: int) -> None:
        """Add the exact sums `values * 2**scale` (object array of ints)."""
        if self.sum is None:
            self.sum, self.scale = values, scale
            return
        if scale < self.scale:
            self.sum = self.sum * (1 << (self.scale - scale))
            self.scale = scale
        elif scale > self.scale:
            values = values * (1 << (scale - self.scale))
        self.sum = self.sum + values

    def merge(self, other: ChannelMeanObserver) -> None:
        """Fold in `other`'s sums and count: exact, so merging shards equals one pass."""
        if other.sum is None:
            return
        if self.sum is not None and self.sum.shape != other.sum.shape:
            raise ValueError(f"channel count differs: {self.sum.shape[0]} vs {other.sum.shape[0]}")
        self._add(other.sum, other.scale)
        self.count += other.count

    def mean(self) -> np.ndarray | None:
        """Per-channel mean (float64, the exact mean correctly rounded), None when nothing was
        observed."""
        if self.sum is None or self.count == 0:
            return None
        if self.scale >= 0:
            parts = [Fraction(int(v) << self.scale, self.count) for v in self.sum]
        else:
            parts = [Fraction(int(v), self.count << -self.scale) for v in self.sum]
        return np.array([float(p) for p in parts], dtype=np.float64)

    def reset(self) -> None:
        self.sum, self.scale, self.count = None, 0, 0


def _exact_integers(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Finite float64 `values` as Python ints `n` and a scale with `values == n * 2**scale`
    exactly (an object array; the scale is the least exponent among the non-zero values)."""
    mantissa, exponent = np.frexp(values)  # values = m 2^e, 0.5 <= |m| < 1
    integers = np.ldexp(mantissa, 53).astype(np.int64)  # exact: 53 bits
    exponent = exponent.astype(np.int64) - 53
    nonzero = integers != 0
    scale = int(exponent[nonzero].min()) if nonzero.any() else 0
    shifts = np.where(nonzero, exponent - scale, 0)
    return np.left_shift(integers.astype(object), shifts.astype(object)), scale


class ChannelRangeObserver:
    """Streaming per-channel min and max along the last axis (docstring 13).

    State: two float64 vectors. `update` takes any array whose last axis keeps its length
    (a change is a programming error: ValueError); NaN/inf values are ignored.
    """

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def update(self, array: np.ndarray, key: int | None = None) -> None:
        """Fold one array in (`key` is accepted for the observers' common interface)."""
        x = np.asarray(array)
        if x.ndim == 0 or x.size == 0:
            return
        rows = x.reshape(-1, x.shape[-1])
        if not np.all(np.isfinite(rows)):
            rows = np.where(np.isfinite(rows), rows, np.nan)
        low = np.nanmin(rows, axis=0).astype(np.float64)
        high = np.nanmax(rows, axis=0).astype(np.float64)
        if self.low is None or self.high is None:
            self.low, self.high = low, high
        elif self.low.shape != low.shape:
            raise ValueError(f"channel count changed: {self.low.shape[0]} -> {low.shape[0]}")
        else:
            self.low = np.fmin(self.low, low)
            self.high = np.fmax(self.high, high)

    def merge(self, other: ChannelRangeObserver) -> None:
        """Fold in `other`'s per-channel minima and maxima (exact)."""
        if other.low is None or other.high is None:
            return
        if self.low is None or self.high is None:
            self.low, self.high = other.low.copy(), other.high.copy()
        elif self.low.shape != other.low.shape:
            raise ValueError(f"channel count differs: {self.low.shape[0]} vs {other.low.shape[0]}")
        else:
            self.low = np.fmin(self.low, other.low)
            self.high = np.fmax(self.high, other.high)

    def value(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(per-channel min, per-channel max), None when nothing was observed."""
        if self.low is None or self.high is None:
            return None
        return self.low, self.high

    def reset(self) -> None:
        self.low = self.high = None


def qparams_for_range(
    lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False
) -> tuple[float, int]:
    """(scale, zero_point) covering [lo, hi] (widened to hold 0) on a uint8/int8 grid.

    The algebra is `onnxshrink.quant.schemes.Scheme.qparams` (module docstring, 7-9).
    """
    if dtype not in ("uint8", "int8"):
        raise UsageError(f"quantized type {dtype!r}: expected uint8 or int8")
    return Scheme(8, signed=dtype == "int8", symmetric=symmetric).qparams(lo, hi)


class MinMaxObserver(Observer):
    """Running min and max (module docstring, 5)."""


class HistogramObserver(Observer):
    """A growing histogram over [-a, a] serving percentile, entropy and mse (module docstring 6).

    `bins` is B, the number of bins over [0, a]; the histogram holds 2B counts. `symmetric`
    matters for `percentile` only (percentile of |x|, or separate lower/upper percentiles).
    """

    def __init__(
        self,
        method: str = "percentile",
        bins: int = DEFAULT_BINS,
        percentile: float = DEFAULT_PERCENTILE,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if method not in ("percentile", "entropy", "mse"):
            raise UsageError(f"histogram method {method!r}: expected percentile, entropy or mse")
        if bins < 128 or bins & (bins - 1):
            raise UsageError(f"histogram bins {bins}: must be a power of two >= 128")
        if not 50.0 < percentile <= 100.0:
            raise UsageError(f"percentile {percentile:g}: must be in (50, 100]")
        self.method = method
        self.bins = bins
        self.percentile = percentile
        self.symmetric = symmetric
        self.bound = 0.0  # a: the histogram covers [-a, a]
        self.hist = np.zeros(2 * bins, dtype=np.int64)
        self.updates = 0

    @property
    def width(self) -> float:
        """The bin width a / B (0 while everything seen is 0)."""
        return self.bound / self.bins

    def edges(self) -> np.ndarray:
        """The 2B + 1 bin edges over [-a, a]."""
        return np.linspace(-self.bound, self.bound, 2 * self.bins + 1)

    def _update(self, x: np.ndarray, lo: float, hi: float, key: int | None) -> None:
        reach = max(-lo, hi)
        if reach >= self.bound and reach > 0.0:
            self._grow(reach)
        B = self.bins
        if self.bound == 0.0:  # everything so far is exactly 0: bin [0, w)
            self.hist[B] += x.size
            return
        # Bin index floor(x / w) + B (docstring 6, 14): the factor B / a is a power of two, so
        # x * factor is exact, and so is its floor; + B is then exact too (an integer below
        # 2^24), and lands in [0, 2B) since |x| < a. So a value gets the same bin whether it is
        # binned here or at a finer bound and regrouped. float32 where the product cannot
        # underflow to a signed zero (factor >= 1/2) nor the factor overflow; float64 otherwise,
        # and for float64 data (rounding it to float32 would depend on the path).
        factor = B / self.bound
        fast = 0.5 <= factor < 2.0**100 and x.dtype.itemsize <= 4
        work = np.float32 if fast else np.float64
        flat = x.reshape(-1)
        self.updates += 1
        if flat.size > 2 * HIST_SAMPLE:  # docstring 6: a systematic sample of a large tensor
            stride = (flat.size // HIST_SAMPLE) | 1
            # the offset depends on the run (the key), not on how many runs this observer saw
            offset = ((self.updates if key is None else key) * 7919) % stride
            flat = flat[offset::stride]
        # in blocks, with buffers reused: the temporaries stay in cache (about 1.2x faster
        # than whole-tensor temporaries on the zoo's activations), the counts are the same
        block = min(flat.size, _HIST_BLOCK)
        scaled = np.empty(block, dtype=work)
        index = np.empty(block, dtype=np.intp)
        for start in range(0, flat.size, block):
            part = flat[start : start + block]
            n = part.size
            np.multiply(part, work(factor), out=scaled[:n], dtype=work)
            np.floor(scaled[:n], out=scaled[:n])
            scaled[:n] += work(B)
            index[:n] = scaled[:n]  # an exact integer in [0, 2B)
            self.hist += np.bincount(index[:n], minlength=2 * B)

    def _grow(self, reach: float) -> None:
        """Widen [-a, a] to a power of two above `reach`, by doubling when there are counts to
        merge (docstring 6, 14)."""
        if self.bound == 0.0:
            # Nothing but zeros so far (they sit in bin [0, w) at any width).
            self.bound = _power_of_two_above(reach)
            return
        doublings = 0
        bound = self.bound
        while bound <= reach:
            bound *= 2.0
            doublings += 1
        self._regroup(doublings)
        self.bound = bound

    def _regroup(self, doublings: int) -> None:
        """Sum the counts into the bins of a range `2^doublings` times wider (the bound is the
        caller's to set): new bin k (each side, from 0) holds old bins [k f, (k+1) f)."""
        if doublings == 0:
            return
        B = self.bins
        group = min(1 << min(doublings, 62), B)
        kept = B // group
        pos = self.hist[B:].reshape(kept, group).sum(axis=1)
        neg = self.hist[:B][::-1].reshape(kept, group).sum(axis=1)
        self.hist[:] = 0
        self.hist[B : B + kept] = pos
        self.hist[B - kept : B] = neg[::-1]

    def merge(self, other: Observer) -> None:
        """Fold in `other`'s histogram (module docstring 14): the finer of the two is regrouped
        to the coarser bound, as growing would, then the counts add. The result is the
        histogram one observer would hold having seen both data (the same bins, the same
        samples of large tensors when updates carry their run's key)."""
        if not isinstance(other, HistogramObserver) or other.bins != self.bins:
            raise ValueError("can only merge a HistogramObserver with as many bins")
        super().merge(other)
        hist = other.hist
        if other.bound > self.bound:
            if self.bound == 0.0:  # only zeros here: they sit in bin [0, w) at any bound
                self.bound = other.bound
            else:
                self._regroup(_doublings(self.bound, other.bound))
                self.bound = other.bound
        elif other.bound < self.bound and other.bound > 0.0:
            finer = HistogramObserver(self.method, self.bins, self.percentile, self.symmetric)
            finer.hist = other.hist.copy()
            finer._regroup(_doublings(other.bound, self.bound))
            hist = finer.hist
        self.hist += hist
        self.updates += other.updates

    def abs_hist(self) -> np.ndarray:
        """The |x| histogram: B counts, bin k covering [k w, (k+1) w)."""
        B = self.bins
        return self.hist[B:] + self.hist[:B][::-1]

    def range(self) -> tuple[float, float]:
        """The clipping range chosen by the method (lo <= 0 <= hi)."""
        self._check_seen()
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if self.bound == 0.0:
            return lo, hi
        if self.method == "percentile" and not self.symmetric:
            edges = self.edges()
            low = _cdf_quantile(self.hist, edges, 1.0 - self.percentile / 100.0)
            high = _cdf_quantile(self.hist, edges, self.percentile / 100.0)
            return max(lo, min(low, 0.0)), min(hi, max(high, 0.0))
        if self.method == "percentile":
            edges = np.linspace(0.0, self.bound, self.bins + 1)
            t = _cdf_quantile(self.abs_hist(), edges, self.percentile / 100.0)
        elif self.method == "entropy":
            t = entropy_threshold(self.abs_hist(), self.width, 256 if self.min >= 0 else 128)
        else:
            t = mse_threshold(self.abs_hist(), self.width, 255 if self.min >= 0 else 127)
        return max(lo, -t), min(hi, t)


def _power_of_two_above(reach: float) -> float:
    """The least power of two strictly above `reach` (> 0): a histogram's first bound, so
    that two observers' bounds always differ by whole doublings (docstring 14). Strictly
    above, so that no value sits on the bound (it would be clipped into the last bin, which
    regrouping cannot reproduce)."""
    _, exponent = math.frexp(reach)  # reach = m 2^e, 0.5 <= m < 1: 2^e > reach >= 2^(e-1)
    try:
        return math.ldexp(1.0, exponent)
    except OverflowError:  # beyond float64: the doubling loop would overflow as well
        return math.inf


def _doublings(fine: float, coarse: float) -> int:
    """How many doublings take power-of-two bound `fine` to `coarse` (>= fine)."""
    count = math.frexp(coarse)[1] - math.frexp(fine)[1]
    if math.ldexp(fine, count) != coarse:
        raise ValueError(f"histogram bounds {fine!r} and {coarse!r} are not aligned")
    return count


def _cdf_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The q-quantile of histogrammed data, linear within a bin (module docstring 6a)."""
    cum = np.cumsum(hist)
    total = cum[-1]
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, len(hist) - 1)
    before = cum[k - 1] if k > 0 else 0
    inside = hist[k]
    frac = (target - before) / inside if inside > 0 else 1.0
    frac = min(max(frac, 0.0), 1.0)
    return float(edges[k] + frac * (edges[k + 1] - edges[k]))


def entropy_threshold(hist: np.ndarray, width: float, levels: int = 128) -> float:
    """The |x| threshold minimizing KL(P || Q) over `levels` quantized bins (docstring 6b).

    `hist` is the |x| histogram (bin k covers [k width, (k+1) width)). Every candidate edge
    i >= levels is evaluated at once; with fewer bins than levels, the whole range is kept.
    """
    h = np.asarray(hist, dtype=np.float64)
    n_bins = h.size
    if n_bins <= levels or h.sum() == 0:
        return n_bins * width
    total = h.sum()
    S = np.concatenate([[0.0], np.cumsum(h)])
    N = np.concatenate([[0.0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    E = np.concatenate([[0.0], np.cumsum(hlogh)])
    cand = np.arange(levels, n_bins + 1)  # i: bins kept
    tail = total - S[cand]  # mass clipped into the last kept bin
    last = h[cand - 1] + tail  # P's last bin
    # sum_k P_k log P_k: the first i-1 bins as in h, the last with the tail folded in.
    plogp = E[cand - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
    # Group boundaries floor(j i / L), j = 0..L, per candidate: shape (C, L+1).
    bounds = (cand[:, None] * np.arange(levels + 1)[None, :]) // levels
    start, stop = bounds[:, :-1], bounds[:, 1:]
    G = S[stop] - S[start]  # Q's mass per group (from h, no tail)
    n = N[stop] - N[start]  # non-zero bins of h per group
    Pg = G.copy()
    # The last group of every candidate also gets the tail; its last bin may turn non-zero.
    Pg[:, -1] += tail
    n[:, -1] += (h[cand - 1] == 0) & (tail > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(G > 0, np.log(G) - np.log(np.maximum(n, 1)), -np.inf)
        cross = np.where(Pg > 0, Pg * log_q, 0.0).sum(axis=1)
        kl = (plogp - cross) / total - np.log(total) + np.log(S[cand])
    kl = np.where(np.isfinite(kl), kl, np.inf)
    best = int(cand[int(np.argmin(kl))])
    return best * width


def mse_threshold(hist: np.ndarray, width: float, steps: int = 127) -> float:
    """The |x| threshold minimizing the expected squared fake-quantization error (docstring 6c).

    `steps` is the number of quantization steps over [0, t] (127 for int8 symmetric, 255 for
    non-negative data on uint8).
    """
    h = np.asarray(hist, dtype=np.float64)
    B = h.size
    if h.sum() == 0:
        return B * width
    centres = (np.arange(B) + 0.5) * width
    cand = np.unique(np.linspace(1, B, min(_MSE_CANDIDATES, B)).round().astype(np.int64))
    # Clipping error over the tail via suffix sums: sum h (c - t)^2 = S2 - 2 t S1 + t^2 S0.
    S0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    S1 = np.concatenate([np.cumsum((h * centres)[::-1])[::-1], [0.0]])
    S2 = np.concatenate([np.cumsum((h * centres**2)[::-1])[::-1], [0.0]])
    t = cand * width
    clip_err = S2[cand] - 2 * t * S1[cand] + t**2 * S0[cand] + S0[cand] * width**2 / 12
    round_err = np.empty(cand.size)
    nonzero = np.flatnonzero(h)
    hc, cc = h[nonzero], centres[nonzero]
    for lo in range(0, cand.size, _MSE_BLOCK):
        i = cand[lo : lo + _MSE_BLOCK]
        s = (i * width / steps)[:, None]
        err = (cc[None, :] - s * np.round(cc[None, :] / s)) ** 2 + width**2 / 12
        err = np.where(s >= width, err, s**2 / 12)
        inside = nonzero[None, :] < i[:, None]
        round_err[lo : lo + _MSE_BLOCK] = (np.where(inside, err, 0.0) * hc[None, :]).sum(axis=1)
    best = int(cand[int(np.argmin(clip_err + round_err))])
    return best * width


def make_observer(
    method: str = "minmax", percentile: float = DEFAULT_PERCENTILE, symmetric: bool = False
) -> Observer:
    """A fresh observer for a calibration method (one of METHODS)."""
    if method == "minmax":
        return MinMaxObserver()
    if method in ("percentile", "entropy", "mse"):
        return HistogramObserver(method, percentile=percentile, symmetric=symmetric)
    raise UsageError(f"calibration method {method!r}: expected one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# Collecting ranges through ORT (module docstring, 10)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def collect_ranges(
    model: onnx.ModelProto,
    tensor_names: list[str],
    feeds: Iterable[Feed],
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    provider: str = "cpu",
    progress: Progress | None = None,
    *,
    symmetric: bool = False,
    workers: int = 1,
) -> dict[str, tuple[float, float]]:
    """The calibration range (lo, hi) of each named float tensor, from one pass over `feeds`.

    Names may be graph inputs, initializers or outputs of main-graph nodes; tensors that are
    not float are left out of the result (logged). One ORT session is built (CPU, or CUDA when
    `provider="cuda"`); every feed runs once. `symmetric` selects |x| percentiles for
    `percentile`. `workers` > 1 runs shards of the feeds in that many processes, with the
    same result (module docstring, 14). Raises UsageError for unknown names, an unknown method
    or provider, or no feeds; and for a model ORT cannot run on a feed, with ORT's first line.
    """
    observers = observe(
        model,
        tensor_names,
        feeds,
        method,
        percentile,
        provider,
        progress,
        symmetric=symmetric,
        workers=workers,
    )
    return {name: obs.range() for name, obs in observers.items()}


@dataclass
class CalibrationStats:
    """What one calibration pass measured: ranges, and per-channel means and ranges where
    asked."""

    ranges: dict[str, tuple[float, float]]
    channel_means: dict[str, np.ndarray]
    channel_ranges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: calibration runs observed
    runs: int = 0


def collect_statistics(
    model: onnx.ModelProto,
    tensor_names: list[str],
    feeds: Iterable[Feed],
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    provider: str = "cpu",
    progress: Progress | None = None,
    *,
    symmetric: bool = False,
    mean_axes: Mapping[str, int] | None = None,
    channel_ranges: Iterable[str] = (),
    on_run: RunHook | None = None,
    on_run_samples: int | None = None,
    workers: int = 1,
) -> CalibrationStats:
    """As `collect_ranges`, plus the per-channel mean of each tensor in `mean_axes` (name ->
    channel axis), in the same single pass. A tensor whose shape does not have that axis, or
    changes its channel count between feeds, gets no mean (logged), never an error.
    `on_run(feed, outputs)` gets each feed with the model's own graph outputs on it (docstring
    12), so a caller can keep the float model's reference outputs without running it again.
    `channel_ranges` names tensors whose per-channel min and max along the last axis are kept
    too (docstring 13). `workers` and `on_run_samples`: as `observe`.
    """
    means = {name: ChannelMeanObserver(axis) for name, axis in (mean_axes or {}).items()}
    per_channel = {name: ChannelRangeObserver() for name in channel_ranges}
    extra: dict[str, list[Any]] = {}
    for name, obs in [*means.items(), *per_channel.items()]:
        extra.setdefault(name, []).append(obs)
    observers, runs = _observe(
        model,
        list(dict.fromkeys([*tensor_names, *extra])),
        feeds,
        method,
        percentile,
        provider,
        progress,
        symmetric=symmetric,
        also=extra,
        on_run=on_run,
        on_run_samples=on_run_samples,
        workers=workers,
    )
    ranges = {name: obs.range() for name, obs in observers.items() if name in set(tensor_names)}
    channel_means = {}
    for name, obs in means.items():
        value = obs.mean()
        if value is not None:
            channel_means[name] = value
    found = {name: obs.value() for name, obs in per_channel.items()}
    return CalibrationStats(
        ranges,
        channel_means,
        {n: v for n, v in found.items() if v is not None},
        runs=runs,
    )


def observe(
    model: onnx.ModelProto,
    tensor_names: list[str],
    feeds: Iterable[Feed],
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    provider: str = "cpu",
    progress: Progress | None = None,
    *,
    symmetric: bool = False,
    also: Mapping[str, Sequence[Any]] | None = None,
    on_run: RunHook | None = None,
    workers: int = 1,
    on_run_samples: int | None = None,
) -> dict[str, Observer]:
    """As `collect_ranges`, but returns the observers (for qparams or several methods' ranges).

    `also` maps tensor names (which must be among `tensor_names`) to extra observers updated
    with the same arrays (per-channel means and ranges); one that fails on an array (a shape
    without its axis) is dropped, with a log line. `on_run(feed, outputs)` is called after each run
    with the model's graph outputs (module docstring, 12); `on_run_samples` says it needs no
    more than the runs holding that many samples (so workers send back only those).
    `workers` > 1 observes contiguous shards of the runs in that many processes and merges
    the observers: the same statistics, exactly (module docstring, 14).
    """
    return _observe(
        model,
        tensor_names,
        feeds,
        method,
        percentile,
        provider,
        progress,
        symmetric=symmetric,
        also=also,
        on_run=on_run,
        workers=workers,
        on_run_samples=on_run_samples,
    )[0]


def _observe(
    model: onnx.ModelProto,
    tensor_names: list[str],
    feeds: Iterable[Feed],
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    provider: str = "cpu",
    progress: Progress | None = None,
    *,
    symmetric: bool = False,
    also: Mapping[str, Sequence[Any]] | None = None,
    on_run: RunHook | None = None,
    workers: int = 1,
    on_run_samples: int | None = None,
) -> tuple[dict[str, Observer], int]:
    """`observe`, and the number of runs."""
    check_workers(workers, "--calibration-workers")
    extra = {name: list(sides) for name, sides in (also or {}).items()}
    make_observer(method, percentile, symmetric)  # validate before any work
    names = list(dict.fromkeys(tensor_names))
    inferred = infer_shapes(model)
    graph = inferred.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = {v.name for v in model_inputs(model)}
    produced = {o for node in graph.node for o in node.output if o}
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for t in initializers.values():
        types[t.name] = t.data_type
    unknown = [n for n in names if n not in initializers and n not in inputs and n not in produced]
    if unknown:
        raise UsageError(
            f"calibration: {', '.join(repr(n) for n in unknown[:5])} "
            f"{'is' if len(unknown) == 1 else 'are'} not a tensor of the main graph"
        )
    wanted = []
    for name in names:
        elem = types.get(name)
        if elem is not None and elem not in _FLOAT_TYPES:
            logger.info("calibration: %s is %s, not float; skipped", name, _type_name(elem))
            continue
        wanted.append(name)
    state = _Observing({n: make_observer(method, percentile, symmetric) for n in wanted}, extra)
    for name in wanted:
        if name in initializers:
            state.observers[name].update(array_of(initializers[name]), key=0)
    runner = _Runner(
        fetched=[],
        from_inputs=[n for n in wanted if n in inputs],
        from_session=[n for n in wanted if n not in initializers and n not in inputs],
        graph_outputs=[o.name for o in model.graph.output] if on_run else [],
    )
    runner.fetched = list(dict.fromkeys([*runner.from_session, *runner.graph_outputs]))
    total = len(feeds) if hasattr(feeds, "__len__") else 0  # type: ignore[arg-type]
    if workers > 1 and total != 1:
        runs = _observe_in_workers(
            model,
            types,
            feeds,
            total,
            runner,
            state,
            _Fresh(method, percentile, symmetric, wanted, extra),
            provider,
            progress,
            on_run,
            on_run_samples,
            workers,
        )
    else:
        session = None
        if runner.fetched:
            with outputs_added(model, runner.fetched, types) as observed:
                session = _calibration_session(observed, provider)
        runs = runner.run(session, feeds, state, on_run, progress=progress, total=total)
    if runs == 0:
        raise UsageError(f"calibration: no feeds; {_HOW_TO}")
    observers = state.observers
    empty = [n for n, o in observers.items() if o.count == 0]
    for name in empty:
        logger.info("calibration: %s produced no float values; skipped", name)
        del observers[name]
    logger.info("calibration: %d tensor(s), %d run(s), method %s", len(observers), runs, method)
    return observers, runs


class _Observing:
    """The observers of one pass (or one shard): a main observer per tensor and, per tensor,
    slots of extra observers (None once dropped: an array it could not take)."""

    def __init__(self, observers: dict[str, Observer], extra: Mapping[str, list[Any]]) -> None:
        self.observers = observers
        self.extra: dict[str, list[Any]] = {name: list(sides) for name, sides in extra.items()}

    def update(self, name: str, array: np.ndarray, key: int) -> None:
        self.observers[name].update(array, key)
        sides = self.extra.get(name, ())
        for i, side in enumerate(sides):
            if side is None:
                continue
            try:
                side.update(array, key)
            except (ValueError, np.exceptions.AxisError) as exc:
                self._drop(name, i, exc)

    def _drop(self, name: str, slot: int, why: object) -> None:
        side = self.extra[name][slot]
        logger.info("calibration: no %s for %s: %s", type(side).__name__, name, why)
        side.reset()
        self.extra[name][slot] = None

    def merge(self, other: _Observing) -> None:
        """Fold in a shard's observers (docstring 14); an extra observer dropped in any shard
        is dropped, as it would have been in one pass."""
        for name, obs in other.observers.items():
            self.observers[name].merge(obs)
        for name, sides in other.extra.items():
            for i, side in enumerate(sides):
                if self.extra[name][i] is None:
                    continue
                if side is None:
                    self._drop(name, i, "dropped in a calibration worker")
                    continue
                try:
                    self.extra[name][i].merge(side)
                except ValueError as exc:
                    self._drop(name, i, exc)


@dataclass
class _Runner:
    """Runs feeds through a calibration session and hands every array to the observers."""

    fetched: list[str]
    from_inputs: list[str]
    from_session: list[str]
    graph_outputs: list[str]

    def run(
        self,
        session: Any,
        feeds: Iterable[Feed],
        state: _Observing,
        on_run: RunHook | None,
        *,
        first: int = 0,
        progress: Progress | None = None,
        total: int = 0,
    ) -> int:
        """Observe every feed (run `first + i` for the i-th); the number of runs."""
        runs = 0
        for feed in feeds:
            index = first + runs
            key = index + 1  # 0 is the initializers'
            for name in self.from_inputs:
                state.update(name, feed[name], key)
            if session is not None:
                try:
                    arrays = session.run(self.fetched, feed)
                except Exception as exc:
                    shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feed.items())
                    raise UsageError(
                        f"calibration: the model fails on feed {index} ({shapes}): "
                        f"{first_line(exc)}"
                    ) from None
                by_name = dict(zip(self.fetched, arrays, strict=True))
                del arrays
                for name in self.from_session:
                    array = by_name[name]
                    if np.issubdtype(np.asarray(array).dtype, np.floating):
                        state.update(name, array, key)
                if on_run is not None:
                    on_run(feed, [by_name[n] for n in self.graph_outputs])
                del by_name
            runs += 1
            if progress is not None:
                progress(runs, total)  # total 0: a loader, whose length is unknown
        return runs


# --------------------------------------------------------------------------------------------
# Calibration in worker processes (module docstring, 14)


@dataclass(frozen=True)
class _Fresh:
    """What a worker needs to build empty observers like the parent's."""

    method: str
    percentile: float
    symmetric: bool
    names: list[str]
    extra: Mapping[str, list[Any]]

    def state(self) -> _Observing:
        observers = {
            n: make_observer(self.method, self.percentile, self.symmetric) for n in self.names
        }
        return _Observing(observers, self.extra)


@dataclass
class _ShardJob:
    """One worker's share: runs [first, stop) from an .npz source it reads itself, or `feeds`."""

    model_path: str
    runner: _Runner
    fresh: _Fresh
    provider: str
    threads: int
    first: int
    stop: int
    npz: NpzSource | None
    feeds: list[Feed] | None
    #: keep the feeds and graph outputs of the shard's first runs holding this many samples
    keep_samples: int
    declared: dict[str, tuple[int, int | None]]


@dataclass
class _ShardResult:
    state: _Observing
    runs: int
    kept: list[tuple[Feed, list[np.ndarray]]]


def _observe_shard(job: _ShardJob) -> _ShardResult:
    """A worker process's pass over its shard, with its own ORT session (made here: a session
    does not pickle) limited to its share of the CPUs."""
    session = None
    if job.runner.fetched:
        session = _calibration_session(job.model_path, job.provider, threads=job.threads)
    feeds = _shard_feeds(job, job.feeds, job.first, job.stop)
    kept: list[tuple[Feed, list[np.ndarray]]] = []
    held = 0

    def keep(feed: Feed, outputs: list[np.ndarray]) -> None:
        nonlocal held
        if held < job.keep_samples:
            kept.append((feed, outputs))
            held += feed_samples(feed, job.declared)

    state = job.fresh.state()
    on_run = keep if job.runner.graph_outputs and job.keep_samples > 0 else None
    runs = job.runner.run(session, feeds, state, on_run, first=job.first)
    return _ShardResult(state, runs, kept)


def _more_runs(
    job: _ShardJob, listed: list[Feed] | None, first: int, samples: int
) -> list[tuple[Feed, list[np.ndarray]]]:
    """Feeds from run `first` on, with the model's graph outputs, until they hold `samples`
    samples: what the hook needs beyond the first shard (only with few samples per shard)."""
    session = _calibration_session(job.model_path, job.provider)
    feeds = _shard_feeds(job, listed[first:] if listed is not None else None, first, None)
    kept: list[tuple[Feed, list[np.ndarray]]] = []
    for feed in feeds:
        kept.append((feed, session.run(job.runner.graph_outputs, feed)))
        samples -= feed_samples(feed, job.declared)
        if samples <= 0:
            break
    return kept


def _shard_feeds(
    job: _ShardJob, listed: list[Feed] | None, first: int, stop: int | None
) -> Iterable[Feed]:
    """The feeds of runs [first, stop): `listed`, or read from the job's .npz source."""
    if listed is not None:
        return listed
    assert job.npz is not None
    header = onnx.load(job.model_path, load_external_data=False)
    data = calibration_feeds(job.npz.path, header, job.npz.batch, max_batch=job.npz.max_batch)
    return itertools.islice(data, first, stop)


def _observe_in_workers(
    model: onnx.ModelProto,
    types: dict[str, int],
    feeds: Iterable[Feed],
    total: int,
    runner: _Runner,
    state: _Observing,
    fresh: _Fresh,
    provider: str,
    progress: Progress | None,
    on_run: RunHook | None,
    on_run_samples: int | None,
    workers: int,
) -> int:
    """Observe contiguous shards of the runs in `workers` worker processes, merge their
    observers into `state` in shard order, and hand the kept runs to `on_run` in run order.

    An .npz source is re-read by each worker (its own rows only); any other source (a loader,
    generated inputs, feed lists) is read here and its arrays sent.
    """
    npz = getattr(feeds, "npz", None)
    listed: list[Feed] | None = None
    if npz is None or total == 0:
        listed = list(feeds)
        total = len(listed)
        npz = None
    if total == 0:
        return 0
    workers = min(workers, total)
    declared = declared_batches(model)
    bounds = [round(i * total / workers) for i in range(workers + 1)]
    threads = max(1, available_cpus() // workers)
    # The hook's runs come back from the first shard only when it says how many samples it
    # needs (the budget's reference: a few runs); the rare shortfall is made up below.
    unlimited = on_run is not None and on_run_samples is None
    keep = 0 if on_run is None else total * 2**20 if unlimited else int(on_run_samples or 0)
    with tempfile.TemporaryDirectory(prefix="onnxshrink-calibration-") as tmp:
        path = Path(tmp) / "observed.onnx"
        with outputs_added(model, runner.fetched, types) as observed:
            write_model_files(observed, path, "observed.onnx.data")
        jobs = [
            _ShardJob(
                str(path),
                runner,
                fresh,
                provider,
                threads,
                lo,
                hi,
                npz,
                listed[lo:hi] if listed is not None else None,
                keep if i == 0 or unlimited else 0,
                declared,
            )
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ]
        context = start_method(cuda=provider == "cuda")
        results: list[_ShardResult | None] = [None] * len(jobs)
        done = 0
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_observe_shard, job): i for i, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    results[futures[future]] = result
                    done += result.runs
                    if progress is not None:
                        progress(done, total)
            except BrokenProcessPool as exc:
                raise OnnxShrinkError(
                    f"calibration: a worker process died ({first_line(exc)}); "
                    "try fewer --calibration-workers"
                ) from None
            finally:
                for future in futures:
                    future.cancel()
        finished = [result for result in results if result is not None]
        assert len(finished) == len(jobs)
        runs = 0
        for shard in finished:
            state.merge(shard.state)
            runs += shard.runs
        if on_run is not None:
            kept = [run for shard in finished for run in shard.kept]
            held = sum(feed_samples(feed, declared) for feed, _ in kept)
            if held < keep and not unlimited and bounds[1] < total:
                kept += _more_runs(jobs[0], listed, bounds[1], keep - held)
            for feed, outputs in kept:
                on_run(feed, outputs)
    logger.info("calibration: %d run(s) in %d worker(s), %d thread(s) each", runs, workers, threads)
    return runs


def _type_name(elem: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem).lower()
    except ValueError:
        return str(elem)


def _calibration_session(model: onnx.ModelProto | str, provider: str, threads: int = 0) -> Any:
    """An ORT session of `model` (a model or a path) for calibration; `threads` sets
    `intra_op_num_threads` (0: ORT's default, every core)."""
    import onnxruntime as ort

    if provider not in ("cpu", "cuda"):
        raise UsageError(f"calibration provider {provider!r}: expected cpu or cuda")
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(
                "calibration provider cuda: CUDAExecutionProvider is not available in this "
                "onnxruntime (install onnxruntime-gpu), use cpu"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        # ORT ignores OMP_NUM_THREADS: a worker's share of the CPUs is set here
        options.intra_op_num_threads = threads
    try:
        return inference_session(model, options, providers)
    except Exception as exc:
        raise UsageError(
            f"calibration: ONNX Runtime cannot load the model: {first_line(exc)}"
        ) from None
