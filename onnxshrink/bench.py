"""Latency, throughput and memory of ONNX models on ONNX Runtime's CPU, CUDA and TensorRT providers.

How `benchmark` measures, per requested provider:

1. Providers. `cpu`, `cuda` and `tensorrt` map to ORT's CPUExecutionProvider,
   CUDAExecutionProvider and TensorrtExecutionProvider (TensorRT lists CUDA and CPU after it, so
   that nodes TensorRT cannot take run on CUDA first). One that `onnxruntime` does not offer, or
   that it offers but cannot start (missing CUDA/cuDNN/TensorRT libraries), is skipped with one
   line saying what to install; the others still run.
2. Sessions. One session per model, all in this process, sequential execution, 1 inter-op thread,
   `threads` intra-op threads (ORT's default when None) and idle-thread spinning off
   (`session.intra_op.allow_spinning = 0`), so that the threads of the session that just ran do
   not spin on the cores the next one needs. ORT's default graph optimizations stay on: this is
   the latency a user of the model gets.
3. Memory (`peak_mb`). Sessions are created one model at a time, and each one's first run follows
   its creation at once. On CPU, `peak_mb` is how far the process's peak resident memory (VmHWM,
   reset through /proc/self/clear_refs just before) rose above its resident memory before the
   session was created, over creation and that first run: what this model adds to a process.
   Memory the process freed earlier stays resident in the C allocator's free lists, and a new
   session reuses it without raising the resident figure (after `optimize`'s calibration, the
   original model read 0.29 MB); so glibc's `malloc_trim(0)` hands free memory back to the system
   first. Without glibc (no `malloc_trim`) or /proc, `peak_mb` is None rather than a figure that
   depends on what the process did before. On
   CUDA/TensorRT it is the growth of the GPU's used memory over the same span (NVML, device-wide:
   other processes on the GPU count too), or, without NVML, the largest arena that ORT's profile
   reports for the device; None when neither is available. `peak_source` says which.
4. Timing. `warmup` rounds, then `runs` rounds; in each round every model runs once, the order
   rotating by one each round (A B C, B C A, C A B, ...), so that clock changes and load from
   other processes hit all models alike. Each run is timed alone with `time.perf_counter`. ORT
   synchronizes the device at the end of each run, so GPU times are complete. With `iobinding`,
   inputs are copied to the device once and outputs stay there (ORT's IOBinding), so transfers
   are not timed; without it, `session.run` copies inputs in and outputs out every run.
   `ratio` is this row's p50 over the p50 of the first model on the same provider.
   `throughput` is samples per second: the size of axis 0 of the model's first input divided by
   the mean latency. `input_shapes` are the shapes of the feed every timing ran on. `session_s` is session creation; `first_run_s` the first run, untimed
   otherwise, which does the lazy work (cuDNN's algorithm search; TensorRT builds its engines
   there when input shapes are dynamic, at session creation when they are static).
5. Placement. A separate session with ORT profiling on runs the same feed twice; each Node event
   of the profile names the provider that ran it. `placement` is the share of executed nodes per
   provider (nodes as ORT runs them, after its own fusions; a TensorRT engine counts as one node
   however many model nodes it holds; copies between devices are left out) and `time_share` the
   share of kernel time. A row warns when the requested provider is not the one running most
   nodes (for TensorRT, most kernel time), and when a quantized model (QLinear*, QuantizeLinear,
   DequantizeLinear, MatMulInteger, ConvInteger, ...) has nodes that fell back to CPU under CUDA
   or TensorRT: ORT does that silently for ops without a kernel on the device.
6. Failures of one model (ORT cannot load it, or it fails on the inputs) are recorded in
   `skipped` and the other models still run; nothing raises for them. Bad arguments raise
   UsageError before anything runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import platform
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxshrink.engine.io import apply_session_threads, graph_protos, load_model, save_model
from onnxshrink.engine.shapes import pin_input_shapes
from onnxshrink.errors import UsageError, first_line, require_onnxruntime
from onnxshrink.verify.parity import (
    DEFAULT_BATCH,
    DEFAULT_DYNAMIC_DIM,
    InputBatches,
    declared_batches,
    feed_samples,
    generate_inputs,
    input_failure,
    model_inputs,
)

if TYPE_CHECKING:  # imported lazily at run time: loading onnxruntime takes a while
    import onnxruntime as ort

    from onnxshrink.engine.optimize import OptimizeResult

logger = logging.getLogger(__name__)

# Short names on the command line -> ORT's execution provider names.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_ALIASES = {"trt": "tensorrt", "gpu": "cuda"}
_INSTALL_HINTS = {
    "cuda": "install the GPU build in place of the CPU one: `pip uninstall onnxruntime && "
    "pip install 'onnxruntime-gpu[cuda,cudnn]'` (the extras bring the CUDA and cuDNN libraries "
    "it was built for); it needs an NVIDIA GPU and driver",
    "tensorrt": "install onnxruntime-gpu (in place of onnxruntime) and the TensorRT its EP was "
    "built against (`pip install tensorrt-cuNN` for CUDA NN, of the major version the EP links), "
    "its libraries importable as tensorrt_libs or on LD_LIBRARY_PATH; bench/gpu_check.sh sets "
    "this up",
}
# EPs that compile whole subgraphs into one kernel: node counts say little, kernel time more.
_COMPILING_PROVIDERS = {"TensorrtExecutionProvider"}
_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "MatMulNBits",
}

ProgressFn = Callable[[int, int], None]


@dataclass
class BenchRow:
    """The figures of one model on one provider (times in milliseconds)."""

    model: str
    provider: str
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    session_s: float
    peak_mb: float | None
    placement: dict[str, float]
    ratio: float | None
    runs: int
    samples: int = 1
    first_run_s: float = 0.0
    peak_source: str | None = None
    time_share: dict[str, float] = field(default_factory=dict)
    nodes_executed: int = 0
    fallback_ops: dict[str, int] = field(default_factory=dict)
    quantized: bool = False
    session_providers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: the shape of each input of the feed the timings ran on
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: what the model is in a comparison (`benchmark_optimized`: original, lossless, result)
    role: str | None = None


@dataclass
class Environment:
    """Where the figures were taken."""

    onnxruntime: str
    available_providers: list[str]
    cpu_count: int | None
    threads: int | None
    python: str = ""
    platform: str = ""
    gpu: str | None = None


@dataclass
class BenchReport:
    """All rows, what was skipped and why, and the environment."""

    rows: list[BenchRow]
    skipped: list[tuple[str, str]]
    environment: Environment
    warmup: int = 0
    runs: int = 0
    iobinding: bool = False
    batch: int | None = None

    @property
    def warnings(self) -> list[str]:
        """Every row's warnings, each prefixed with its model and provider."""
        return [f"{r.model} on {r.provider}: {w}" for r in self.rows for w in r.warnings]

    def to_dict(self) -> dict:
        """A JSON-ready dict (skipped entries become {"provider", "reason"} objects)."""
        data = asdict(self)
        data["skipped"] = [{"provider": p, "reason": r} for p, r in self.skipped]
        data["warnings"] = self.warnings
        return data

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)


def parse_providers(spec: str | Sequence[str]) -> list[str]:
    """`"cpu,cuda"` (or a list of such strings) -> ["cpu", "cuda"]; raise UsageError on bad names.

    Accepts the short names (cpu, cuda, tensorrt; trt as an alias) and ORT's own names.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    by_ort_name = {v.lower(): k for k, v in PROVIDERS.items()}
    for part in parts:
        for raw in part.split(","):
            name = raw.strip().lower()
            if not name:
                continue
            name = _ALIASES.get(name, by_ort_name.get(name, name))
            if name not in PROVIDERS:
                raise UsageError(
                    f"bad --provider {raw.strip()!r}: expected one or more of "
                    f"{', '.join(PROVIDERS)} (comma-separated)"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError("--provider names no provider: expected e.g. cpu or cpu,cuda,tensorrt")
    return names


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model (subgraphs included) holds quantization ops (QLinear*, Q/DQ, *Integer)."""
    return any(
        node.op_type.startswith("QLinear") or node.op_type in _QUANT_OPS
        for graph in graph_protos(model.graph)
        for node in graph.node
    )


@dataclass
class _Model:
    """One model to measure: its path as given, its feed and what the checks need."""

    label: str
    path: Path
    feed: dict[str, np.ndarray]
    samples: int
    quantized: bool
    from_file: bool = False  # the feed is the user's --inputs, not generated


@dataclass
class _Live:
    """A model's session on the provider being measured, with its binding and times."""

    model: _Model
    session: ort.InferenceSession
    session_s: float
    binding: ort.IOBinding | None = None
    first_run_s: float = 0.0
    peak_mb: float | None = None
    peak_source: str | None = None
    times_ms: list[float] = field(default_factory=list)

    def run(self) -> None:
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding)
        else:
            self.session.run(None, self.model.feed)


def benchmark(
    models: Sequence[str | os.PathLike[str] | onnx.ModelProto]
    | str
    | os.PathLike[str]
    | onnx.ModelProto,
    providers: Sequence[str] | str = ("cpu",),
    threads: int | None = None,
    batch: int | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    warmup: int = 10,
    runs: int = 50,
    iobinding: bool = False,
    progress: ProgressFn | None = None,
    device_id: int = 0,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike[str] | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
) -> BenchReport:
    """Time each model on each provider in interleaved rounds: `onnxshrink bench` from Python.

    `models` are paths (reported as given) or ModelProtos (written to a temporary folder for
    ONNX Runtime, reported as `model N`, N their place in `models`); `labels`, one per model,
    replace those names. `input_shapes` pins dims of named inputs (each name must be an input
    of at least one model); `batch` sets axis 0 of generated inputs whose axis 0 the model
    leaves dynamic; `inputs` is an .npz with one array per input name (a folder of them), axis
    0 the samples, for every model (each takes the arrays it names): a model is timed on the
    first run of it that `InputBatches` makes, `batch` samples (default: a fixed batch one of
    the models declares, else at most DEFAULT_BATCH), or the model's own fixed batch (a file of
    8 samples times one sample on a model pinned to batch 1). Raises UsageError for bad
    arguments (ModelLoadError for missing or invalid models; unknown provider names, shapes
    that do not fit) and OnnxRuntimeMissingError; providers that cannot run land in `skipped`,
    as do models that fail. `progress(done, total)` is called after every round. The first
    model is the reference of each row's `ratio`.
    """
    require_onnxruntime()
    if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
        models = [models]  # one model, not a string of characters
    if labels is not None and len(labels) != len(models):
        raise UsageError(f"{len(labels)} label(s) for {len(models)} model(s)")
    with contextlib.ExitStack() as stack:
        models, shown = _model_files(models, stack)
        labels = list(labels) if labels is not None else shown
        import onnxruntime as ort

        names = parse_providers(providers)
        if not models:
            raise UsageError("no model to benchmark")
        if runs < 1:
            raise UsageError(f"--runs must be at least 1 (got {runs})")
        if warmup < 0:
            raise UsageError(f"--warmup must be 0 or more (got {warmup})")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {threads})")
        if batch is not None and batch < 1:
            raise UsageError(f"--batch must be at least 1 (got {batch})")

        prepared = _prepare_models(models, labels, input_shapes or {}, batch, inputs, seed)
        available = ort.get_available_providers()
        environment = Environment(
            onnxruntime=ort.__version__,
            available_providers=list(available),
            cpu_count=os.cpu_count(),
            threads=threads,
            python=platform.python_version(),
            platform=platform.platform(),
        )
        report = BenchReport([], [], environment, warmup, runs, iobinding, batch)

        runnable: list[str] = []
        for name in names:
            if PROVIDERS[name] in available:
                runnable.append(name)
            else:
                report.skipped.append(
                    (
                        name,
                        f"{PROVIDERS[name]} is not available in this onnxruntime {ort.__version__} "
                        f"(it offers {', '.join(available)})"
                        + (f"; {_INSTALL_HINTS[name]}" if name in _INSTALL_HINTS else ""),
                    )
                )
        if any(n in ("cuda", "tensorrt") for n in runnable):
            _preload_gpu_libraries("tensorrt" in runnable)
            environment.gpu = _Nvml.get().name(device_id)

        total = len(runnable) * (warmup + runs)
        done = 0
        with _trt_cache_dir(trt_cache, "tensorrt" in runnable) as cache_dir:
            for name in runnable:
                options = _provider_list(name, device_id, trt_fp16, cache_dir)

                def step(k: int, base: int = done) -> None:
                    if progress:
                        progress(base + k, total)

                rows, skipped = _bench_provider(
                    name,
                    prepared,
                    options,
                    threads,
                    warmup,
                    runs,
                    iobinding,
                    device_id,
                    step,
                )
                done += warmup + runs
                if progress:
                    progress(done, total)
                report.rows.extend(rows)
                report.skipped.extend(skipped)
        return report


def _model_files(
    models: Sequence[str | os.PathLike[str] | onnx.ModelProto], stack: contextlib.ExitStack
) -> tuple[list[str], list[str]]:
    """Paths for `benchmark` (ModelProtos written to a temporary folder that `stack` removes)
    and the names rows show by default."""
    paths: list[str] = []
    names: list[str] = []
    scratch: str | None = None
    for i, m in enumerate(models):
        if isinstance(m, onnx.ModelProto):
            if scratch is None:
                scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxshrink-"))
            paths.append(str(save_model(m, Path(scratch) / f"model{i + 1}.onnx")))
            names.append(f"model {i + 1}")
        else:
            paths.append(str(m))
            names.append(str(m))
    return paths, names


def benchmark_optimized(
    original: str | os.PathLike[str],
    result: OptimizeResult,
    providers: Sequence[str] | str = ("cpu",),
    **options,
) -> BenchReport:
    """`benchmark` of what `optimize` made: the original, the lossless rewrite when a lossy stage
    ran (`result.lossless_path`: its fp32 model, written aside from memory), and the result.

    Three rows per provider with a lossy stage, so that the speed-up of the lossless rewrite is
    not credited to int8 (or pruning); two without. Each row's `role` says which model it is;
    the lossless row's label says it was not written. `options` go to `benchmark`.
    """
    if result.output_path is None:
        raise UsageError("--bench times the written result: there is none (nothing written)")
    models: list[tuple[str, str | os.PathLike[str], str]] = [("original", original, str(original))]
    if result.lossless_path is not None:
        models.append(
            (
                "lossless",
                result.lossless_path,
                f"{Path(original).stem}.lossless.onnx (not written)",
            )
        )
    models.append(("result", result.output_path, str(result.output_path)))
    report = benchmark(
        [path for _, path, _ in models],
        providers,
        labels=[label for _, _, label in models],
        **options,
    )
    roles = {label: role for role, _, label in models}
    for row in report.rows:
        row.role = roles.get(row.model)
    return report


def _prepare_models(
    models: Sequence[str],
    labels: Sequence[str],
    input_shapes: dict[str, list[int]],
    batch: int | None,
    inputs: str | os.PathLike[str] | None,
    seed: int,
) -> list[_Model]:
    loaded = [(label, Path(m), load_model(m)) for label, m in zip(labels, models, strict=True)]
    known = {i.name for _, _, proto in loaded for i in proto.graph.input}
    for name in input_shapes:
        if name not in known:
            raise UsageError(
                f"--input-shape names {name!r}, which is not an input of any model "
                f"({', '.join(sorted(known)) or 'none'})"
            )
    # One batch size for every model where it is free to choose: a fixed batch that another
    # model declares (its original beside its optimized copy), else --batch, else runs of at
    # most DEFAULT_BATCH; so that the models are timed on the same feed.
    fixed = {
        size
        for _, _, proto in loaded
        for _, size in declared_batches(proto).values()
        if size is not None and size > 0
    }
    common = batch if batch is not None or len(fixed) != 1 else next(iter(fixed))
    prepared = []
    for label, path, proto in loaded:
        if inputs is not None:
            feed, samples = _first_batch(inputs, proto, common)
        else:
            feed = _generated_feed(label, proto, input_shapes, batch, seed)
            first = next((v for v in feed.values() if v.ndim > 0), None)
            samples = int(first.shape[0]) if first is not None else 1
        prepared.append(
            _Model(label, path, feed, max(samples, 1), is_quantized(proto), inputs is not None)
        )
    return prepared


def _first_batch(
    inputs: str | os.PathLike[str], model: onnx.ModelProto, batch: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """The first run `InputBatches` makes of `inputs` for `model` (axis 0: samples), and the
    samples it holds: what the model is timed on."""
    batches = InputBatches(Path(inputs), model, batch, max_batch=DEFAULT_BATCH)
    feed = next(iter(batches))
    return feed, feed_samples(feed, declared_batches(model))


def _generated_feed(
    label: str,
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    batch: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    graph_inputs = model_inputs(model)
    own = {k: v for k, v in input_shapes.items() if k in {i.name for i in graph_inputs}}
    # Check names, ranks and fixed dims on a copy holding only the inputs.
    probe = onnx.ModelProto()
    probe.graph.input.extend(graph_inputs)
    try:
        pin_input_shapes(probe, own)
    except UsageError as exc:
        raise UsageError(f"{label}: {exc}") from None
    shapes: dict[str, list[int]] = {}
    batched = False
    for value in graph_inputs:
        dims = list(value.type.tensor_type.shape.dim)
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 0 for d in dims]
        shape = list(
            own.get(
                value.name,
                [d or (1 if i == 0 else DEFAULT_DYNAMIC_DIM) for i, d in enumerate(declared)],
            )
        )
        if batch is not None and shape and not declared[0]:
            shape[0] = batch
            batched = True
        shapes[value.name] = shape
    if batch is not None and batch != 1 and not batched:
        raise UsageError(
            f"{label}: no input has a dynamic axis 0, so --batch {batch} cannot change it "
            f"(inputs: {', '.join(f'{k}{v}' for k, v in shapes.items())})"
        )
    return generate_inputs(model, shapes, seed=seed)


def _provider_list(name: str, device_id: int, fp16: bool, cache_dir: str | None) -> list:
    """ORT's `providers` argument for one short name, with documented provider options."""
    cuda = (
        "CUDAExecutionProvider",
        {
            "device_id": str(device_id),
            # ORT's default, named so the choice is visible: try every cuDNN conv algorithm
            # once (in the first run, which the warmup absorbs) and keep the fastest.
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        },
    )
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt_options = {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache_dir or "",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache_dir or "",
    }
    return [("TensorrtExecutionProvider", trt_options), cuda, "CPUExecutionProvider"]


def _session_options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # fatal only: a model failing on the inputs is reported as a skipped row, in one line
    options.log_severity_level = 4
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def _bench_provider(
    name: str,
    models: list[_Model],
    providers: list,
    threads: int | None,
    warmup: int,
    runs: int,
    iobinding: bool,
    device_id: int,
    progress: Callable[[int], None],
) -> tuple[list[BenchRow], list[tuple[str, str]]]:
    """Interleaved timing of every model on one provider; failures become skipped entries."""

    ep = PROVIDERS[name]
    skipped: list[tuple[str, str]] = []
    live: list[_Live] = []
    for m in models:
        opened = _open(m, name, providers, threads, iobinding, device_id)
        if isinstance(opened, _Live):
            live.append(opened)
            continue
        reason, provider_unusable = opened
        skipped.append((name, reason))
        if provider_unusable:  # every model would fail the same way
            return [], skipped
    del opened  # only `live` holds sessions: clearing it frees them
    if not live:
        return [], skipped

    _time_rounds(live, warmup, runs, progress)
    rows = [_row(item, name, runs) for item in live]
    measured = [item.model for item in live]
    # Free the timed sessions before the profiling ones are made.
    live.clear()
    for row, m in zip(rows, measured, strict=True):
        _profile_placement(row, m, providers, threads, ep)
    # The first model is the reference; when it failed on this provider there is no ratio.
    first = rows[0] if measured[0] is models[0] else None
    for row in rows:
        row.ratio = row.p50_ms / first.p50_ms if first is not None and first.p50_ms > 0 else None
    return rows, skipped


def _time_rounds(
    live: list[_Live], warmup: int, runs: int, progress: Callable[[int], None]
) -> None:
    """Warmup rounds, then timed rounds; each round runs every model once, in rotated order."""
    for i in range(warmup):
        for item in _rotated(live, i):
            item.run()
        progress(i + 1)
    for i in range(runs):
        for item in _rotated(live, i):
            start = time.perf_counter_ns()
            item.run()
            item.times_ms.append((time.perf_counter_ns() - start) / 1e6)
        progress(warmup + i + 1)


def _row(item: _Live, name: str, runs: int) -> BenchRow:
    times = np.asarray(item.times_ms)
    mean = float(times.mean())
    return BenchRow(
        model=item.model.label,
        provider=name,
        p50_ms=float(np.percentile(times, 50)),
        p90_ms=float(np.percentile(times, 90)),
        mean_ms=mean,
        min_ms=float(times.min()),
        throughput=item.model.samples / (mean / 1000.0) if mean > 0 else float("inf"),
        session_s=item.session_s,
        first_run_s=item.first_run_s,
        peak_mb=item.peak_mb,
        placement={},
        ratio=None,
        runs=runs,
        samples=item.model.samples,
        input_shapes={k: [int(d) for d in v.shape] for k, v in item.model.feed.items()},
        peak_source=item.peak_source,
        quantized=item.model.quantized,
        session_providers=list(item.session.get_providers()),
    )


def _open(
    m: _Model, name: str, providers: list, threads: int | None, iobinding: bool, device_id: int
) -> _Live | tuple[str, bool]:
    """A session for one model, its first run done and its memory measured; or why not.

    The alternative to a `_Live` is (reason, whether the provider itself is unusable).
    """
    ep = PROVIDERS[name]
    meter = _GpuMemory(device_id) if name != "cpu" else _HostMemory()
    meter.start()
    start = time.perf_counter()
    try:
        session, ep_error = _create_session(m.path, _session_options(threads), providers)
    except Exception as exc:
        return f"{m.label}: ONNX Runtime cannot create a session: {first_line(exc, 300)}", False
    session_s = time.perf_counter() - start
    if ep not in session.get_providers():
        # ORT lists the EP but could not start it (missing libraries): it said why and fell back.
        return (
            f"{ep} is listed by onnxruntime but could not be started"
            + (f" ({ep_error})" if ep_error else "")
            + f"; ORT fell back to {', '.join(session.get_providers())}; "
            + _INSTALL_HINTS.get(name, ""),
            True,
        )
    try:
        binding = _bind(session, m.feed, name, device_id) if iobinding else None
        item = _Live(m, session, session_s, binding=binding)
        start = time.perf_counter()
        # The first run allocates the arena (part of the memory figure) and does the lazy work:
        # cuDNN algorithm search, TensorRT engine builds for dynamic shapes.
        item.run()
        item.first_run_s = time.perf_counter() - start
    except Exception as exc:
        return (
            f"{m.label}: fails on the inputs {input_failure(session, m.feed, exc, m.from_file)}",
            False,
        )
    item.peak_mb, item.peak_source = meter.stop()
    return item


def _create_session(
    path: Path, options, providers: list
) -> tuple[ort.InferenceSession, str | None]:
    """An InferenceSession, with what ORT's Python layer printed when an EP failed to start.

    When creating a session with a GPU EP fails, onnxruntime prints "EP Error ..." on stdout
    and retries with fallback providers; that text must not reach our stdout (`--json -`).
    """
    import onnxruntime as ort

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        session = ort.InferenceSession(
            str(path), apply_session_threads(options), providers=providers
        )
    error = next(
        (line.strip() for line in printed.getvalue().splitlines() if line.startswith("EP Error ")),
        None,
    )
    if error:
        logger.info("%s", printed.getvalue().strip())
    return session, error[:300] if error else None


def _rotated(items: list, i: int) -> list:
    k = i % len(items)
    return items[k:] + items[:k]


def _bind(session, feed: dict[str, np.ndarray], name: str, device_id: int):
    """An IOBinding with inputs copied to the provider's device once and outputs left there."""
    import onnxruntime as ort

    device = "cpu" if name == "cpu" else "cuda"
    dev_id = 0 if device == "cpu" else device_id
    binding = session.io_binding()
    for value in session.get_inputs():
        array = np.ascontiguousarray(feed[value.name])
        binding.bind_ortvalue_input(
            value.name, ort.OrtValue.ortvalue_from_numpy(array, device, dev_id)
        )
    for value in session.get_outputs():
        binding.bind_output(value.name, device, dev_id)
    return binding


def _profile_placement(
    row: BenchRow, model: _Model, providers: list, threads: int | None, ep: str
) -> None:
    """Fill placement, time share and fallback warnings from an ORT profile of two runs."""

    with tempfile.TemporaryDirectory(prefix="onnxshrink-profile-") as tmp:
        try:
            session, _ = _create_session(
                model.path, _session_options(threads, os.path.join(tmp, "profile")), providers
            )
            for _ in range(2):
                session.run(None, model.feed)
            path = session.end_profiling()
            with open(path, encoding="utf-8") as f:
                events = json.load(f)
        except Exception as exc:
            row.warnings.append(f"placement unknown: profiling failed ({first_line(exc, 300)})")
            return
        del session
    nodes, kernel_us = parse_profile(events)
    if row.peak_mb is None and ep != "CPUExecutionProvider":
        arena = max(
            (
                int(e.get("args", {}).get("mem_arena_held", 0) or 0)
                for e in events
                if isinstance(e, dict) and e.get("args", {}).get("provider") == ep
            ),
            default=0,
        )
        if arena:
            row.peak_mb, row.peak_source = arena / 2**20, "ORT device arena"
    counts = Counter(provider for provider, _ in nodes.values())
    total = sum(counts.values())
    row.nodes_executed = total
    if not total:
        row.warnings.append("placement unknown: the profile holds no node events")
        return
    row.placement = {p: c / total for p, c in counts.most_common()}
    time_total = sum(kernel_us.values())
    if time_total > 0:
        row.time_share = {
            p: t / time_total for p, t in sorted(kernel_us.items(), key=lambda kv: -kv[1])
        }
    row.warnings.extend(_placement_warnings(row, nodes, ep))


def parse_profile(events: list) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
    """From ORT profile events: {node name: (provider, op type)} and kernel µs per provider.

    Only `Node` events that name a provider count; ORT's Memcpy nodes (copies between devices)
    are left out. A node that ran several times counts once.
    """
    nodes: dict[str, tuple[str, str]] = {}
    kernel_us: defaultdict[str, float] = defaultdict(float)
    for event in events:
        if not isinstance(event, dict) or event.get("cat") != "Node":
            continue
        args = event.get("args") or {}
        provider = args.get("provider")
        name = str(event.get("name", ""))
        if not provider or not name.endswith("_kernel_time"):
            continue
        op = str(args.get("op_name", "?"))
        if op.startswith("Memcpy"):
            continue
        nodes[name[: -len("_kernel_time")]] = (provider, op)
        kernel_us[provider] += float(event.get("dur", 0) or 0)
    return nodes, dict(kernel_us)


def _placement_warnings(row: BenchRow, nodes: dict[str, tuple[str, str]], ep: str) -> list[str]:
    warnings = []
    short = _short(ep)
    share = row.placement.get(ep, 0.0)
    if share == 0.0:
        warnings.append(
            f"no node ran on {short}: everything ran on "
            f"{', '.join(f'{_short(p)} {s:.0%}' for p, s in row.placement.items())}"
        )
    elif ep in _COMPILING_PROVIDERS:
        busy = row.time_share.get(ep, 0.0)
        if row.time_share and busy < 0.5:
            top = max(row.time_share, key=row.time_share.__getitem__)
            warnings.append(
                f"most kernel time ({row.time_share[top]:.0%}) is spent on {_short(top)}, "
                f"{short} takes {busy:.0%}"
            )
    else:
        top = next(iter(row.placement))
        if top != ep:
            warnings.append(
                f"most nodes ({row.placement[top]:.0%}) ran on {_short(top)}, not on {short} "
                f"({share:.0%})"
            )
    if row.quantized and ep != "CPUExecutionProvider":
        cpu_ops = Counter(op for p, op in nodes.values() if p == "CPUExecutionProvider")
        row.fallback_ops = dict(cpu_ops.most_common())
        if cpu_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in cpu_ops.most_common(6))
            more = "" if len(cpu_ops) <= 6 else ", ..."
            warnings.append(
                f"quantized model: {sum(cpu_ops.values())} node(s) fell back to CPU ({ops}{more}); "
                f"{short} has no kernel for them, so they run on CPU with copies around them"
            )
    return warnings


def _short(ep: str) -> str:
    return ep.removesuffix("ExecutionProvider")


@contextlib.contextmanager
def _trt_cache_dir(path: str | os.PathLike[str] | None, needed: bool) -> Iterator[str | None]:
    """The TensorRT engine cache: the given folder, else a temporary one for this run only.

    A temporary cache keeps `session_s` honest (the engine is built once, in the timed session's
    creation) while the profiling session reuses it.
    """
    if not needed:
        yield None
    elif path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield str(path)
    else:
        with tempfile.TemporaryDirectory(prefix="onnxshrink-trt-") as tmp:
            yield tmp


def _preload_gpu_libraries(tensorrt: bool) -> None:
    """Load CUDA/cuDNN (and TensorRT) libraries installed as Python packages, when present.

    onnxruntime-gpu >= 1.21 has `preload_dlls` for the nvidia-* wheels. TensorRT's wheel puts
    libnvinfer in the `tensorrt_libs` package folder, which the dynamic loader does not search;
    loading it here by path satisfies the TensorRT EP's dependency by soname.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # best effort: the EP reports what is still missing
            logger.info("onnxruntime.preload_dlls failed: %s", exc)
    if not tensorrt:
        return
    try:
        import tensorrt_libs  # type: ignore[import-not-found]
    except ImportError:
        return
    folder = Path(next(iter(tensorrt_libs.__path__)))
    pending = sorted(folder.glob("lib*.so*"))
    # Some libraries need others loaded first; retry until no more load.
    while pending:
        failed = []
        for lib in pending:
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(lib)
        if len(failed) == len(pending):
            logger.info("could not preload %s", ", ".join(p.name for p in failed))
            break
        pending = failed


class _HostMemory:
    """Peak resident memory growth of this process (Linux: VmHWM reset via clear_refs), free
    memory handed back first (glibc's malloc_trim), so that reused free pages count (module
    docstring, 3)."""

    def start(self) -> None:
        self.resettable = _trim_heap()
        self.base = _status_kb("VmRSS")
        if not self.resettable:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def stop(self) -> tuple[float | None, str | None]:
        peak = _status_kb("VmHWM")
        if self.base is None or peak is None or not self.resettable:
            return None, None
        return max(peak - self.base, 0) / 1024.0, "host RSS (heap trimmed first)"


def _trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc `malloc_trim(0)`); False without it."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _GpuMemory:
    """Growth of the GPU's used memory (NVML, device-wide) over session creation + first run."""

    def __init__(self, device_id: int):
        self.device_id = device_id

    def start(self) -> None:
        self.base = _Nvml.get().used_bytes(self.device_id)

    def stop(self) -> tuple[float | None, str | None]:
        used = _Nvml.get().used_bytes(self.device_id)
        if self.base is None or used is None:
            return None, None
        return max(used - self.base, 0) / 2**20, "GPU used (NVML)"


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class _Nvml:
    """The few NVML calls needed, through ctypes (the driver ships libnvidia-ml)."""

    _instance: _Nvml | None = None

    @classmethod
    def get(cls) -> _Nvml:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        self.lib = None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() == 0:
                self.lib = lib
        except (OSError, AttributeError):
            self.lib = None

    def _handle(self, device_id: int) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
        """The library and the device's handle; None without NVML or without that device."""
        handle = ctypes.c_void_p()
        if self.lib is None or self.lib.nvmlDeviceGetHandleByIndex_v2(
            ctypes.c_uint(device_id), ctypes.byref(handle)
        ):
            return None
        return self.lib, handle

    def used_bytes(self, device_id: int) -> int | None:
        found = self._handle(device_id)
        if found is None:
            return None
        lib, handle = found
        info = _NvmlMemory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)):
            return None
        return int(info.used)

    def name(self, device_id: int) -> str | None:
        found = self._handle(device_id)
        if found is None:
            return None
        lib, handle = found
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlDeviceGetName(handle, buf, ctypes.c_uint(96)):
            return None
        return buf.value.decode(errors="replace")
