"""Static int8 quantization of the PP-OCR zoo models, side by side (issue 4).

Usage: `.venv/bin/python bench/quantize_zoo.py [--models a,b] [--calib N] [--eval N] [--runs N]
[--method M] [--json FILE]`

For each PP-OCR model in models/zoo/ (det, rec and cls of v4 and v5) it prints one row per way
of producing a model:

1. `fp32`: the original file.
2. `lossless`: `onnxshrink.optimize(path, input_shapes=...)`, still fp32 (inputs pinned to the
   latency shape below).
3. `ort static`: onnxruntime's `quantize_static` as its documentation shows it: QDQ format,
   default options (MinMax calibration, int8 activations and weights, per tensor), a
   `CalibrationDataReader` over the calibration feeds.
4. `expert`: the hand-made pipeline of issue 4: `onnxslim.slim`, opset raised to 13 when lower
   (per-channel DequantizeLinear needs `axis`), then `quantize_static` with
   `op_types_to_quantize=[Conv, MatMul, Gemm]`, `per_channel=True`, Percentile calibration,
   uint8 activations (the docstring's advice for x86 with VNNI) and every depthwise Conv
   (group == C_in, found from the weights, not from names) in `nodes_to_exclude`.
5. `onnxshrink int8`: the lossless result through `onnxshrink.rules.int8.quantize_int8`, exactly what
   `onnxshrink optimize --quantize int8` runs: statistics from the calibration feeds
   (`--method`, default percentile), bias correction, the default error budget (the most
   sensitive layers stay float; notes: how many, and the output error of the fully quantized
   model -> the returned one).

Every model is produced in a child process (this script with `--worker`), so that a tool that
runs out of memory or crashes fails its own row only; the child's wall time (loading the data
and the model included, interpreter start-up excluded) and peak RSS are the `make s` and
`peak MB` columns. Its address space is capped (`--mem-limit`), so that a calibrator that
keeps every activation in memory fails with MemoryError instead of taking the machine down.

Columns, all on held-out evaluation data (models/data.py's `eval` split, disjoint from the
`calib` split the quantizers see):

6. rec: character error rate (%) of greedy CTC decoding against the rendered ground truth, and
   its change from fp32 in points; and "CER vs fp32 out", the CER of its decoding against
   fp32's own decoding: how much quantization changed what the model reads, which the ground
   truth figure mixes with fp32's own mistakes (a change can fix one as well as add one).
7. det: IoU of the probability map thresholded at 0.3 with fp32's map, pooled over the pages
   (sum of intersections over sum of unions).
8. cls: argmax agreement with fp32 (%).
9. latency: median over `--runs` interleaved rounds (every session once per round, the order
   rotating), 2 intra-op threads, idle spinning off, ORT's default graph optimizations, on one
   evaluation input of shape rec 1x3x48x320, det 1x3x640x640, cls 1x3x48x192; shown as the ratio
   to the original fp32 model.
10. size: file size over the original's.

Below the table, one line per model names the fastest row at fp32's accuracy and the fastest
row at least as accurate as the expert pipeline (the bar issue 4 sets for onnxshrink).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ZOO_DIR = REPO / "models" / "zoo"
MODELS = (
    "ppocr-v4-det",
    "ppocr-v4-rec",
    "ppocr-v4-cls",
    "ppocr-v5-det",
    "ppocr-v5-rec",
    "ppocr-v5-cls",
)
LATENCY_SHAPES = {"det": [1, 3, 640, 640], "rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}
DEFAULT_EVAL = {"det": 16, "rec": 256, "cls": 256}
ROWS = ("fp32", "lossless", "ort static", "expert", "onnxshrink int8")
DET_THRESHOLD = 0.3
WARMUP = 3
THREADS = 2
EXPERT_OPS = ["Conv", "MatMul", "Gemm"]
EXPERT_OPSET = 13


def task_of(model: str) -> str:
    """det, rec or cls, from the zoo name."""
    return model.rsplit("-", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Producing the models (child processes)


class _Folder:
    """Feeds read back one .npz file at a time (memory does not grow with the count)."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(Path(folder).glob("*.npz"))

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        for file in self.files:
            with np.load(file) as z:
                yield {k: z[k] for k in z.files}


def _ort_reader(folder: Path):
    """An onnxruntime CalibrationDataReader over the .npz files of `folder`."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = _Folder(folder)
            self.start, self.end = 0, len(self.feeds)
            self.rewind()

        def rewind(self) -> None:
            self.it = iter(self.feeds.files[self.start : self.end])

        def get_next(self):
            file = next(self.it, None)
            if file is None:
                return None
            with np.load(file) as z:
                return {k: z[k] for k in z.files}

        def __len__(self) -> int:
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, end_index
            self.rewind()

    return Reader()


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes with group == C_in (one input channel per group), main graph.

    C_in is read from the weight (`W.shape[1] * group`), an initializer or a Constant node;
    convs whose weight shape is unknown are not listed.
    """
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = shapes.get(node.input[1])
        if dims and len(dims) >= 3 and group > 1 and group == dims[1] * group:  # C_in
            found.append(node.name)
    return found


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _produce(row: str, job: dict) -> dict:
    """Write the model of `row` to job['out']; returns notes for the table."""
    source, out, calib = Path(job["source"]), Path(job["out"]), Path(job["calib"])
    shape = LATENCY_SHAPES[task_of(job["model"])]
    notes: dict = {}
    if row == "lossless" or row == "onnxshrink int8":
        import onnxshrink

        input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
        result = onnxshrink.optimize(source, None, input_shapes={input_name: shape})
        if row == "lossless":
            onnx.save(result.model, str(out))
            return notes
        # exactly what `onnxshrink optimize --quantize int8` runs on the lossless model
        from onnxshrink.rules.int8 import quantize_int8

        method = job["method"]
        int8 = quantize_int8(result.model, str(calib), method=method, target="ort-cpu")
        budget = int8.budget
        onnx.save(int8.model, str(out))
        notes["method"] = method
        notes["quantized nodes"] = len(int8.quantized)
        notes["kept float"] = len(int8.kept_float)
        notes["sensitive"] = len(budget.kept_float)
        notes["error"] = f"{budget.full_error:.2g}->{budget.final_error:.2g}"
        return notes

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if row == "ort static":
        quantize_static(str(source), str(out), _ort_reader(calib), quant_format=QuantFormat.QDQ)
        return notes
    if row == "expert":
        import onnxslim
        from onnx import version_converter

        model = onnxslim.slim(onnx.load(str(source)))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset < EXPERT_OPSET:
            model = version_converter.convert_version(model, EXPERT_OPSET)
        _name_nodes(model)
        excluded = depthwise_convs(model)
        notes["depthwise excluded"] = len(excluded)
        quantize_static(
            model,
            str(out),
            _ort_reader(calib),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=EXPERT_OPS,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=excluded,
        )
        return notes
    raise ValueError(f"unknown row {row!r}")


def _worker(job_text: str) -> int:
    """Child process: produce one model, write a JSON result next to it."""
    job = json.loads(job_text)
    if job.get("mem_limit_gb"):
        limit = int(job["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import logging

    logging.disable(logging.WARNING)  # ORT's quantizer warns on stderr; the table says enough
    start = time.perf_counter()
    result: dict = {"error": None, "notes": {}}
    try:
        result["notes"] = _produce(job["row"], job)
    except MemoryError:
        result["error"] = f"out of memory (address space capped at {job['mem_limit_gb']:g} GB)"
    except BaseException as exc:  # noqa: BLE001 - any failure is a finding for the table
        text = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
    result["seconds"] = time.perf_counter() - start
    result["peak_mb"] = _peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _peak_rss_mb() -> float | None:
    """This process's peak RSS since exec (VmHWM); ru_maxrss would carry the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def produce(row: str, job: dict, timeout: float) -> dict:
    """Run `_worker` for one row in a child process; a crash or a kill becomes `error`."""
    result_file = Path(job["out"]).with_suffix(".json")
    job = {**job, "row": row, "result": str(result_file)}
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": timeout, "notes": {}}
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()
    how = (
        f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    )
    return {
        "error": f"worker {how}" + (f": {tail[-1][:300]}" if tail else ""),
        "seconds": time.perf_counter() - start,
        "notes": {},
    }


# ---------------------------------------------------------------------------------------------
# Judging them (this process)


@dataclass
class Variant:
    """One row: how a model was produced and how it does."""

    row: str
    path: str | None = None
    error: str | None = None
    seconds: float | None = None
    peak_mb: float | None = None
    notes: dict = field(default_factory=dict)
    bytes: int | None = None
    metric: float | None = None  # CER % (rec), IoU (det), agreement % (cls)
    delta: float | None = None  # rec: CER points over fp32
    drift: float | None = None  # rec: CER % of its decoding against fp32's decoding
    latency_ms: float | None = None
    latency_ratio: float | None = None
    size_ratio: float | None = None


@dataclass
class ModelResult:
    """All rows of one zoo model."""

    model: str
    task: str
    calib: int
    eval: int
    variants: list[Variant] = field(default_factory=list)
    data_seconds: float = 0.0
    eval_seconds: float = 0.0
    best: str = ""


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin by default: the threads of the session that just ran would
    # steal the 2 cores from the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _outputs(sess, x: np.ndarray) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]


def _decode(model: str, out: list[np.ndarray]) -> list[str]:
    from models import data

    classes = data.ctc_classes(model)
    return [data.ctc_greedy_decode(o, classes)[0] for o in out]


def _judge(task: str, model: str, ref: list[np.ndarray], out: list[np.ndarray], truth) -> float:
    from models import data

    if task == "rec":
        classes = data.ctc_classes(model)
        texts = [data.ctc_greedy_decode(o, classes)[0] for o in out]
        return 100.0 * data.cer(texts, truth)
    if task == "det":
        inter = union = 0
        for r, o in zip(ref, out, strict=True):
            a, b = r > DET_THRESHOLD, o > DET_THRESHOLD
            inter += int(np.logical_and(a, b).sum())
            union += int(np.logical_or(a, b).sum())
        return inter / union if union else 1.0
    agree = [int(np.argmax(r)) == int(np.argmax(o)) for r, o in zip(ref, out, strict=True)]
    return 100.0 * float(np.mean(agree))


def _latencies(sessions: dict, feed: dict, runs: int) -> dict[str, float]:
    """Median ms per session, interleaved with the order rotating every round."""
    names = list(sessions)
    for _ in range(WARMUP):
        for name in names:
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def _better_or_equal(task: str, a: float, b: float) -> bool:
    """Whether metric a is at least as good as b (CER: lower is better)."""
    return a <= b + 1e-9 if task == "rec" else a >= b - 1e-9


def bench_model(
    name: str,
    ns: argparse.Namespace,
    workdir: Path,
    log: Callable[[str], None],
) -> ModelResult:
    """Produce, judge and time every row of one model; failures land in the rows."""
    from models import data

    task = task_of(name)
    n_eval = ns.eval if ns.eval is not None else DEFAULT_EVAL[task]
    res = ModelResult(name, task, ns.calib, n_eval)
    source = ZOO_DIR / f"{name}.onnx"
    start = time.perf_counter()
    calib_dir = workdir / f"{name}.calib"
    data.save_npz(data.feeds_for(name, "calib", ns.calib), calib_dir)
    truth: list[str] | list[int] | list[list[tuple[int, int, int, int]]]
    if task == "rec":
        x_eval, truth = data.rec_lines(name, "eval", n_eval)
    elif task == "cls":
        x_eval, truth = data.cls_lines(name, "eval", n_eval)
    else:
        x_eval, truth = data.det_pages(name, "eval", n_eval)
    res.data_seconds = time.perf_counter() - start

    job = {
        "model": name,
        "source": str(source),
        "calib": str(calib_dir),
        "method": ns.method,
        "mem_limit_gb": ns.mem_limit,
    }
    for row in ROWS:
        v = Variant(row)
        if row == "fp32":
            v.path, v.seconds = str(source), 0.0
        else:
            out = workdir / f"{name}.{row.replace(' ', '-')}.onnx"
            log(f"{name}: {row} ...")
            got = produce(row, {**job, "out": str(out)}, ns.timeout)
            v.error, v.seconds, v.notes = got["error"], got.get("seconds"), got.get("notes", {})
            v.peak_mb = got.get("peak_mb")
            if v.error is None:
                v.path = str(out)
        if v.path:
            v.bytes = Path(v.path).stat().st_size
        res.variants.append(v)

    start = time.perf_counter()
    sessions, outputs = {}, {}
    for v in res.variants:
        if v.path is None:
            continue
        try:
            sessions[v.row] = _session(v.path)
        except Exception as exc:
            v.error = f"ORT cannot load it: {_first_line(exc)}"
            continue
        try:
            outputs[v.row] = _outputs(sessions[v.row], x_eval)
        except Exception as exc:
            v.error = f"ORT fails on it: {_first_line(exc)}"
            sessions.pop(v.row)
    ref = outputs.get("fp32")
    fp32 = res.variants[0]
    if ref is not None:
        for v in res.variants:
            if v.row in outputs:
                v.metric = _judge(task, name, ref, outputs[v.row], truth)
        if task == "rec":
            fp32_texts = _decode(name, ref)
            assert fp32.metric is not None  # fp32 gave ref, so it was judged above
            for v in res.variants:
                if v.metric is not None:
                    v.delta = v.metric - fp32.metric
                    v.drift = 100.0 * data.cer(_decode(name, outputs[v.row]), fp32_texts)
        lat_feed = {sessions["fp32"].get_inputs()[0].name: x_eval[:1]}
        log(f"{name}: timing {len(sessions)} models x {ns.runs} runs ...")
        lat = _latencies(sessions, lat_feed, ns.runs)
        for v in res.variants:
            if v.row in lat:
                v.latency_ms = lat[v.row]
                v.latency_ratio = lat[v.row] / lat["fp32"]
    for v in res.variants:
        if v.bytes is not None and fp32.bytes:
            v.size_ratio = v.bytes / fp32.bytes
    res.eval_seconds = time.perf_counter() - start
    res.best = _best_line(res)
    return res


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _fastest(rows: list[Variant]) -> Variant | None:
    timed = [
        (v.latency_ratio, v) for v in rows if v.latency_ratio is not None and v.metric is not None
    ]
    return min(timed, key=lambda t: t[0])[1] if timed else None


def _best_line(res: ModelResult) -> str:
    rows = {v.row: v for v in res.variants}
    fp32 = rows["fp32"]
    if fp32.metric is None:
        return "no verdict: the fp32 model did not run"
    task = res.task
    at_fp32 = _fastest(
        [
            v
            for v in res.variants
            if v.metric is not None and _better_or_equal(task, v.metric, fp32.metric)
        ]
    )
    assert at_fp32 is not None  # fp32 ran, so it was timed and qualifies itself
    parts = [f"fastest at fp32 accuracy: {at_fp32.row} ({at_fp32.latency_ratio:.2f}x)"]
    expert = rows["expert"]
    if expert.metric is not None:
        bar = [
            v
            for v in res.variants
            if v.metric is not None and _better_or_equal(task, v.metric, expert.metric)
        ]
        best = _fastest(bar)
        # the expert ran, so it was timed and qualifies itself
        assert best is not None and expert.latency_ratio is not None
        parts.append(
            f"fastest at >= expert accuracy ({_metric_text(task, expert.metric)}): "
            f"{best.row} ({best.latency_ratio:.2f}x)"
        )
        shrink = rows["onnxshrink int8"]
        if shrink.metric is not None and shrink.latency_ratio is not None:
            beats = _better_or_equal(task, shrink.metric, expert.metric) and (
                shrink.latency_ratio <= expert.latency_ratio
            )
            parts.append(
                "onnxshrink int8 " + ("beats" if beats else "does NOT beat") + " the expert"
            )
    else:
        parts.append("expert row failed, no expert bar")
    return "; ".join(parts)


def _metric_text(task: str, value: float | None) -> str:
    if value is None:
        return "-"
    if task == "rec":
        return f"CER {value:.2f}%"
    if task == "det":
        return f"IoU {value:.4f}"
    return f"agree {value:.1f}%"


def render(results: list[ModelResult], ns: argparse.Namespace, total_s: float) -> None:
    """Print the comparison table and the per-model verdicts with rich."""
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(
        title=f"static int8 on the PP-OCR zoo (ORT {ort.__version__} CPU, {THREADS} threads, "
        f"median of {ns.runs} interleaved runs; calib {ns.calib}, onnxshrink method {ns.method})"
    )
    for header in (
        "model",
        "row",
        "task metric (held-out)",
        "Δ CER pt",
        "CER vs fp32 out",
        "latency",
        "ms",
        "size",
        "make s",
        "peak MB",
        "notes / error",
    ):
        table.add_column(
            header, justify="left" if header in ("model", "row", "notes / error") else "right"
        )
    for res in results:
        what = {"rec": "CER", "det": "IoU@0.3 vs fp32", "cls": "agree vs fp32"}[res.task]
        for i, v in enumerate(res.variants):
            note = v.error or ", ".join(f"{k} {val}" for k, val in v.notes.items())
            table.add_row(
                f"{res.model}\n({what}, n={res.eval})" if i == 0 else "",
                v.row,
                _metric_text(res.task, v.metric),
                "-" if v.delta is None else f"{v.delta:+.2f}",
                "-" if v.drift is None else f"{v.drift:.2f}%",
                "-" if v.latency_ratio is None else f"{v.latency_ratio:.2f}x",
                "-" if v.latency_ms is None else f"{v.latency_ms:.1f}",
                "-" if v.size_ratio is None else f"{v.size_ratio:.2f}x",
                "-" if v.seconds is None else f"{v.seconds:.1f}",
                "-" if v.peak_mb is None else f"{v.peak_mb:.0f}",
                f"[red]{note}[/red]" if v.error else note,
                end_section=i == len(res.variants) - 1,
            )
    console.print(table)
    for res in results:
        console.print(f"[bold]{res.model}[/bold]: {res.best}")
    console.print(f"total wall time {total_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 1 when any row failed, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    default_method = "percentile"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples (>= 1)")
    parser.add_argument(
        "--eval", type=int, default=None, help="held-out samples (default rec/cls 64, det 16)"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed rounds per model (>= 1)")
    parser.add_argument(
        "--method",
        default=default_method,
        choices=["minmax", "percentile", "entropy", "mse"],
        help=f"onnxshrink calibration method (default {default_method})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures ('-': stdout only)")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="keep the produced models here")
    parser.add_argument(
        "--mem-limit",
        type=float,
        default=round(0.75 * _mem_total_gb(), 1),
        help="address-space cap per producing child, GB (default 3/4 of RAM)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per producing child")
    ns = parser.parse_args(argv)
    names = [n.strip() for n in ns.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if ns.calib < 1 or ns.runs < 1 or (ns.eval is not None and ns.eval < 1):
        parser.error("--calib, --eval and --runs must be at least 1")
    missing = [n for n in names if not (ZOO_DIR / f"{n}.onnx").is_file()]
    if missing:
        parser.error(f"not in {ZOO_DIR}: {', '.join(missing)} (run `python models/fetch.py`)")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-qbench-") as tmp:
        workdir = ns.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            log(f"{name}: rendering {ns.calib} calibration and held-out samples ...")
            results.append(bench_model(name, ns, workdir, log))
    total = time.perf_counter() - start

    import onnxruntime as ort

    report = {
        "onnxruntime": ort.__version__,
        "threads": THREADS,
        "runs": ns.runs,
        "calib": ns.calib,
        "method": ns.method,
        "cpus": os.cpu_count(),
        "total_seconds": total,
        "models": [asdict(r) for r in results],
    }
    if ns.json == "-":
        print(json.dumps(report, indent=2))
    else:
        render(results, ns, total)
        if ns.json:
            Path(ns.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any(v.error for r in results for v in r.variants) else 0


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


if __name__ == "__main__":
    sys.exit(main())
