"""Fleet mode: optimize many models, one task per model, on a local process pool (or Ray).

`optimize_many(patterns, out_dir, options)` expands the globs, runs `onnxshrink.optimize` on
each model in a worker process (`run_task`), and records every finished model in a manifest in
`out_dir`. What it guarantees:

1. Tasks take paths and return small JSON-able dicts (`run_task`): figures, the output path and
   its sha256, an error line on failure (one line, never a traceback). ONNX Runtime sessions
   are made inside the task, never pickled. Each task sets the intra-op threads of every
   session onnxshrink makes in its process to the CPUs it was given
   (`onnxshrink.engine.io.set_session_threads`): ORT ignores `OMP_NUM_THREADS`.
2. The manifest, `out_dir/manifest.jsonl`: one JSON line per finished model, keyed by the
   sha256 of the model file, a canonical hash of the options, and the onnxshrink and
   onnxruntime versions (`task_key`). A rerun skips a model whose key has a successful line
   and whose output still exists with the recorded sha256. Lines are appended by the parent
   process only, one write per line, flushed and fsync'ed: a run killed midway leaves whole
   lines.
3. A model that fails is retried (`retries`, default 1) in a later round, then recorded with
   its one-line error, never dropped; the other models finish.
4. Outputs are `out_dir/<stem>.opt.onnx`; models whose stems clash get
   `<stem>.<8 hex digits of sha256 of the resolved input path>.opt.onnx` (deterministic: it
   does not depend on which other models are in the run). `optimize` writes atomically.

The backend interface (`LocalPoolBackend` here; `onnxshrink.fleet_ray.RayBackend` on a Ray
cluster implements the same):

    backend.map_unordered(fn, items, *, cpus_per_item: int,
                          exclusive: Callable[[item], bool], retries: int)
        -> Iterator[tuple[item, result | BaseException]]

- `fn` is a picklable module-level function (`run_task`), called as `fn(item)` in a worker;
  `items` are picklable (`FleetTask`). Results are yielded as items finish, in any order,
  each item exactly once.
- `cpus_per_item`: the CPUs each item is given (the backend reserves them; `run_task` reads
  the count from the task itself, `FleetTask.cpus`).
- `exclusive(item)` true: the item does timing work (`--bench`, int8's speed check) and must
  never run beside another exclusive item on the same node (one exclusive resource per node).
  Non-exclusive items may run beside it.
- `retries`: how many times an item whose worker died (killed, out of memory, a crash in
  native code) is run again. When retries are spent, the exception is yielded in place of a
  result. An exception `fn` raises is yielded too (`run_task` never raises: it returns a
  failed record).
- A backend may also have `workers` (int, the items it runs at once) and `close()`.
- A backend with an object store has `put_shared(obj) -> ref`, and resolves the references an
  item holds before `fn` sees it. `optimize_many` then puts the calibration data and the
  `inputs` (an .npz or a folder of them, as a `FileBundle`) once per run, and each task writes
  them into its scratch folder and optimizes from there (`FleetTask.shared`): a cluster needs
  no shared filesystem for them. The manifest key keeps the options' paths.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from onnxshrink.engine.io import available_cpus
from onnxshrink.errors import UsageError, first_line

logger = logging.getLogger(__name__)

#: the manifest's file name in the output folder
MANIFEST = "manifest.jsonl"

#: test-only: a folder; the first attempt of each model's task kills its worker process
#: (os._exit) after leaving a marker file there, so that fault handling can be tested
KILL_ONCE_ENV = "ONNXSHRINK_FLEET_TEST_KILL_ONCE"
#: test-only: a model file name whose every task kills its worker process
KILL_ALWAYS_ENV = "ONNXSHRINK_FLEET_TEST_KILL_ALWAYS"

#: `optimize` keyword arguments a fleet run sets itself or that cannot cross a process
#: (`lossless_output` is set by a task that times a lossy stage's models: `FleetTask.bench`)
_NOT_OPTIONS = ("model", "output", "progress", "passes", "lossless_output")


@dataclass(frozen=True)
class FleetTask:
    """One model to optimize: paths, `onnxshrink.optimize` keyword arguments, the CPUs the
    task was given (its sessions' intra-op threads), which attempt this is, and its manifest
    key (`task_key`)."""

    model: str
    output: str
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    cpus: int = 1
    key: dict[str, str] = field(default_factory=dict)
    #: time the original and the result after writing (`optimize --bench`): {"providers":
    #: "cpu", "runs": 30}; None: no timing
    bench: dict[str, Any] | None = None
    #: data files shipped with the task instead of read from their path (`FileBundle`s, or a
    #: backend's references to them): {optimize option name: bundle}
    shared: dict[str, Any] = field(default_factory=dict)


#: the options whose data `optimize_many` ships through a backend's object store (`put_shared`)
SHIPPED_OPTIONS = ("calibration_data", "inputs")


@dataclass(frozen=True)
class FileBundle:
    """The bytes of a data file, or of the files of a folder (an .npz, a folder of them), to
    recreate where a task runs: on a cluster whose nodes do not share the driver's files."""

    name: str
    files: dict[str, bytes]
    folder: bool

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FileBundle:
        source = Path(path)
        if source.is_dir():
            files = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file()}
            return cls(source.name, files, True)
        return cls(source.name, {source.name: source.read_bytes()}, False)

    def write(self, folder: str | os.PathLike[str]) -> str:
        """Write the bundle under `folder`; the path to give `optimize` in its place."""
        root = Path(folder)
        target = root / self.name if self.folder else root
        target.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (target / name).write_bytes(data)
        return str(target if self.folder else target / self.name)


class Backend(Protocol):
    """What runs fleet tasks (module docstring, "The backend interface")."""

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        cpus_per_item: int,
        exclusive: Callable[[Any], bool],
        retries: int,
    ) -> Iterator[tuple[Any, Any]]: ...


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable_option(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable_option(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable_option(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UsageError(
        f"fleet options must be paths, strings, numbers or lists of them, not {type(value).__name__}"
    )


def normalize_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` checked against `onnxshrink.optimize`'s keyword arguments, made JSON-able,
    and without those left at their default (so `{}` and `{"seed": 0}` are the same run).

    UsageError for a name `optimize` does not take, or one a fleet run sets itself.
    """
    from onnxshrink.engine.optimize import optimize

    params = inspect.signature(optimize).parameters
    normalized: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name not in params or name in _NOT_OPTIONS:
            raise UsageError(f"fleet option {name!r}: not an option of onnxshrink.optimize")
        value = _jsonable_option(value)
        default = params[name].default
        if name == "exclude":
            default = []
        elif default is not inspect.Parameter.empty:
            default = _jsonable_option(default)
        if value != default:
            normalized[name] = value
    return dict(sorted(normalized.items()))


def options_hash(options: dict[str, Any]) -> str:
    """A canonical hash of normalized options: sha256 of their sorted, compact JSON."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict[str, str]:
    """The onnxshrink and onnxruntime versions, part of every manifest key."""
    from onnxshrink import __version__

    try:
        import onnxruntime as ort

        ort_version = str(ort.__version__)
    except ImportError:
        ort_version = "missing"
    return {"onnxshrink": __version__, "onnxruntime": ort_version}


def task_key(
    model_sha256: str, options: dict[str, Any], bench: dict[str, Any] | None = None
) -> dict[str, str]:
    """The manifest key of one model run: model sha256, options hash (timing settings
    included), both versions."""
    hashed = options if bench is None else {**options, "(bench)": bench}
    return {"model_sha256": model_sha256, "options_hash": options_hash(hashed), **versions()}


def _key_id(key: dict[str, str]) -> str:
    return json.dumps(key, sort_keys=True)


def needs_machine_alone(options: dict[str, Any]) -> bool:
    """Whether a task with these options times anything, so that it must not run beside
    another timing task: `bench`, or int8 on target ort-cpu with the speed check on (the
    default for `quantize="int8"`)."""
    if options.get("bench"):
        return True
    quantize = str(options.get("quantize") or "")
    return (
        "int8" in quantize.split("+")
        and bool(options.get("check_speed", True))
        and options.get("target", "ort-cpu") == "ort-cpu"
    )


def _task_exclusive(task: FleetTask) -> bool:
    return task.bench is not None or needs_machine_alone(task.options)


def _kill_once_for_tests(task: FleetTask) -> None:
    if os.environ.get(KILL_ALWAYS_ENV) == Path(task.model).name:
        os._exit(17)
    folder = os.environ.get(KILL_ONCE_ENV)
    if not folder:
        return
    marker = Path(folder) / (hashlib.sha256(task.model.encode()).hexdigest()[:16] + ".killed")
    if marker.exists():
        return
    marker.write_text(task.model)
    os._exit(17)


def run_task(task: FleetTask) -> dict[str, Any]:
    """Optimize one model in this (worker) process; a small JSON-able record, never raises.

    Sets the intra-op threads of every ORT session made here to `task.cpus`, calls
    `onnxshrink.optimize(task.model, task.output, **task.options)` and returns: status
    ("ok" or "failed"), model and output paths, output_sha256, bytes and nodes before and
    after, the parity verdict, the lossy stage's figures when there is one, seconds, and on
    failure `error`, one line (the exception's type and first line, never a traceback).
    """
    from onnxshrink.engine.io import session_threads, set_session_threads

    start = time.perf_counter()
    record: dict[str, Any] = {
        "model": task.model,
        "output": task.output,
        "status": "failed",
        "attempt": task.attempt,
        "cpus": task.cpus,
        "pid": os.getpid(),
    }
    try:
        _kill_once_for_tests(task)
        set_session_threads(task.cpus)
        record["threads"] = session_threads()
        from onnxshrink.engine.optimize import optimize

        lossy = bool(task.options.get("quantize") or task.options.get("sparsify"))
        with tempfile.TemporaryDirectory(prefix="onnxshrink-fleet-") as scratch:
            # with a lossy stage, --bench also times the lossless model, written aside
            aside = Path(scratch, "lossless.onnx") if task.bench is not None and lossy else None
            options = dict(task.options)
            for index, (name, bundle) in enumerate(sorted(task.shared.items())):
                options[name] = bundle.write(Path(scratch, f"shared{index}"))
            if task.shared:
                task = replace(task, options=options)
                record["shipped"] = sorted(task.shared)
            result = optimize(task.model, task.output, **options, lossless_output=aside)
            record.update(_result_figures(result))
            if result.output_path is not None:
                record["output_sha256"] = file_sha256(result.output_path)
            if task.bench is not None:
                record["bench"] = _bench(task, result)
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a task reports every failure as one line
        record["error"] = f"{type(exc).__name__}: {first_line(exc)}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _bench(task: FleetTask, result: Any) -> dict[str, Any]:
    """`optimize --bench` in a task: p50 and ratio to the original of each timed row."""
    from onnxshrink.bench import benchmark_optimized, parse_providers

    assert task.bench is not None
    report = benchmark_optimized(
        task.model,
        result,
        parse_providers(task.bench.get("providers", "cpu")),
        input_shapes=task.options.get("input_shapes") or {},
        inputs=task.options.get("inputs"),
        runs=int(task.bench.get("runs", 30)),
        batch=task.options.get("batch"),
    )
    return _jsonable_figures(
        {
            "rows": [
                {"role": r.role, "provider": r.provider, "p50_ms": r.p50_ms, "ratio": r.ratio}
                for r in report.rows
            ],
            "skipped": [f"{provider}: {reason}" for provider, reason in report.skipped],
        }
    )


def _result_figures(result: Any) -> dict[str, Any]:
    """The few figures of an OptimizeResult a fleet record keeps."""
    figures: dict[str, Any] = {
        "bytes_before": result.before.bytes,
        "bytes_after": result.after.bytes,
        "nodes_before": result.before.nodes_total,
        "nodes_after": result.after.nodes_total,
        "optimize_seconds": round(result.seconds, 3),
    }
    parity = result.parity
    if parity is None:
        figures["parity"] = {"verified": False, "reason": "not checked (verify=False)"}
    else:
        figures["parity"] = {
            "verified": parity.verified,
            "passed": parity.passed,
            "reason": parity.reason,
            "max_rel": max((o.max_rel for o in parity.outputs), default=None),
        }
    stage = result.quantization
    if stage is not None:
        lossy: dict[str, Any] = {
            "stage": stage.stage,
            "changed": len(stage.quantized),
            "layers": len(stage.layers),
            "budget": stage.budget.max_error,
            "calibration_error": stage.budget.final_error,
            "within_budget": stage.budget.within_budget,
        }
        if stage.speed is not None:
            lossy["speed_ratio"] = round(stage.speed.ratio, 4)
        check = result.quantized_parity
        if check is not None and check.verified:
            lossy["held_out"] = check.held_out
            lossy["held_out_error"] = check.error
            if check.metric is not None:
                lossy["metric"] = check.metric
                lossy["metric_value"] = check.metric_value
        figures["lossy"] = lossy
    return _jsonable_figures(figures)


def _jsonable_figures(value: Any) -> Any:
    """Numbers as plain floats, non-finite ones as None (JSON has no NaN)."""
    import math

    if isinstance(value, dict):
        return {k: _jsonable_figures(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable_figures(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


class LocalPoolBackend:
    """Runs fleet tasks on a local `ProcessPoolExecutor` (spawn), `workers` at a time.

    A worker that dies mid-task breaks the whole pool (BrokenProcessPool) and fails every task
    running then; the pool is rebuilt. The culprit cannot be told from the others, so a crash
    is charged to an item only when it ran alone: the items that were running beside a crash
    are run again one at a time, and one that crashes then has used a retry. An item that
    crashed more than `retries` times yields its BrokenProcessPool.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or 1)

    def _pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
        )

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        cpus_per_item: int,
        exclusive: Callable[[Any], bool],
        retries: int,
    ) -> Iterator[tuple[Any, Any]]:
        """Run `fn(item)` for every item; yield (item, result or exception) as each finishes
        (module docstring, "The backend interface"). `cpus_per_item` is for the caller's
        tasks to apply: a local pool cannot pin a process to CPUs portably."""
        del cpus_per_item
        # each entry: [item, crashes charged, runs alone (a suspect after a crash)]
        queue: deque[list[Any]] = deque([item, 0, False] for item in items)
        running: dict[cf.Future[Any], list[Any]] = {}
        pool = self._pool()
        idle_breaks = 0  # pools that broke with nothing running: workers that cannot start
        try:
            while queue or running:
                if not self._fill(pool, fn, queue, running, exclusive) and not running:
                    pool.shutdown(wait=True, cancel_futures=True)
                    idle_breaks += 1
                    if idle_breaks > max(retries, 2):
                        broke = BrokenProcessPool("worker processes cannot start")
                        while queue:
                            yield queue.popleft()[0], broke
                        return
                    pool = self._pool()
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                broken: list[list[Any]] = []
                for future in done:
                    entry = running.pop(future)
                    try:
                        yield entry[0], future.result()
                    except BrokenProcessPool as exc:
                        broken.append(entry)
                        last_error: BaseException = exc
                    except Exception as exc:  # noqa: BLE001 - yielded to the caller
                        yield entry[0], exc
                if not broken:
                    continue
                # every task still running failed with the pool: collect them all
                for future, entry in list(running.items()):
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken.append(entry)
                    except Exception as exc:  # noqa: BLE001
                        yield entry[0], exc
                    else:
                        yield entry[0], result
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = self._pool()
                alone = len(broken) == 1
                for entry in broken:
                    if alone:
                        entry[1] += 1
                    if entry[1] > retries:
                        yield entry[0], last_error
                        continue
                    logger.info("worker died running %r; running it again", entry[0])
                    entry[2] = True
                    queue.appendleft(entry)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fill(
        self,
        pool: cf.ProcessPoolExecutor,
        fn: Callable[[Any], Any],
        queue: deque[list[Any]],
        running: dict[cf.Future[Any], list[Any]],
        exclusive: Callable[[Any], bool],
    ) -> bool:
        """Submit queued items while a worker is free: a suspect only when nothing runs, and
        nothing beside a suspect; an exclusive item only when no exclusive item runs. False
        when the pool turned out broken (a worker died since the last wait): the item stays
        queued, and the running ones fail with the pool."""
        while queue and len(running) < self.workers:
            if any(entry[2] for entry in running.values()):
                return True
            exclusive_running = any(exclusive(entry[0]) for entry in running.values())
            pick = None
            for i, entry in enumerate(queue):
                if entry[2]:
                    if not running:
                        pick = i
                    break  # suspects go first, alone
                if not (exclusive_running and exclusive(entry[0])):
                    pick = i
                    break
            if pick is None:
                return True
            entry = queue[pick]
            try:
                future = pool.submit(fn, entry[0])
            except BrokenProcessPool:
                return False
            del queue[pick]
            running[future] = entry
        return True

    def close(self) -> None:
        """Nothing to release: each `map_unordered` call owns its pool."""


@dataclass
class FleetReport:
    """What `optimize_many` did: one record per model in input order (status "ok", "failed"
    or "skipped": done by an earlier run, its manifest line's figures), the output folder,
    the manifest, and the run's seconds."""

    records: list[dict[str, Any]]
    out_dir: Path
    manifest: Path
    seconds: float
    workers: int
    backend: str = "local"

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]

    @property
    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (`optimize-many --json`)."""
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "backend": self.backend,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "models": self.records,
        }


def expand_patterns(patterns: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files the glob patterns name, sorted, each once (by resolved path).

    UsageError naming a pattern that matches no file.
    """
    found: dict[Path, Path] = {}
    for pattern in patterns:
        text = os.fspath(pattern)
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise UsageError(f"{text}: no model file matches")
        for f in files:
            found.setdefault(f.resolve(), f)
    return [found[k] for k in sorted(found)]


def output_names(models: Sequence[Path]) -> dict[Path, str]:
    """Each model's output file name: `<stem>.opt.onnx`, or where stems clash
    `<stem>.<8 hex of sha256(resolved path)>.opt.onnx` (module docstring, 4)."""
    stems: dict[str, int] = {}
    for m in models:
        stems[m.stem] = stems.get(m.stem, 0) + 1
    names: dict[Path, str] = {}
    for m in models:
        if stems[m.stem] == 1:
            names[m] = f"{m.stem}.opt.onnx"
        else:
            tag = hashlib.sha256(str(m.resolve()).encode()).hexdigest()[:8]
            names[m] = f"{m.stem}.{tag}.opt.onnx"
    return names


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest's records, in order; a line that is not whole JSON (a run killed while
    writing it) is passed over."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def append_manifest(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line: one write, flushed and fsync'ed."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _done_before(record: dict[str, Any] | None, output: Path) -> bool:
    """Whether a manifest record still stands: a success whose output exists unchanged."""
    if record is None or record.get("status") != "ok" or not output.is_file():
        return False
    sha = record.get("output_sha256")
    return sha is None or file_sha256(output) == sha


def _failure_record(task: FleetTask, exc: BaseException) -> dict[str, Any]:
    reason = (
        "worker process died (killed, out of memory, or a crash in native code)"
        if isinstance(exc, BrokenProcessPool)
        else f"{type(exc).__name__}: {first_line(exc)}"
    )
    return {
        "model": task.model,
        "output": task.output,
        "status": "failed",
        "attempt": task.attempt,
        "cpus": task.cpus,
        "error": reason,
        "seconds": None,
    }


def _shipped_data(runner: Backend, options: dict[str, Any]) -> dict[str, Any]:
    """Data files of `options` put once into the backend's object store, where it has one
    (`put_shared`: Ray), so that every task gets them without a shared filesystem: .npz files
    and folders (`SHIPPED_OPTIONS`); loader scripts and "random" stay as they are."""
    put = getattr(runner, "put_shared", None)
    if put is None:
        return {}
    shared: dict[str, Any] = {}
    for name in SHIPPED_OPTIONS:
        value = options.get(name)
        if not isinstance(value, str):
            continue
        path = Path(value)
        if path.is_dir() or (path.suffix == ".npz" and path.is_file()):
            shared[name] = put(FileBundle.read(path))
    return shared


def optimize_many(
    patterns: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: dict[str, Any] | None = None,
    backend: Backend | None = None,
    workers: int | None = None,
    retries: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
    bench: dict[str, Any] | None = None,
) -> FleetReport:
    """Optimize every model the glob `patterns` match into `out_dir`, one task per model.

    - `options`: `onnxshrink.optimize` keyword arguments for every model (paths and plain
      values only: they cross to worker processes and are hashed into the manifest key).
    - `backend`: what runs the tasks (module docstring); default a `LocalPoolBackend` of
      `workers` processes (default 1).
    - `retries`: runs again a model that failed, or whose worker died, at most this often.
    - `progress(record)` is called as each model finishes or is skipped.
    - `bench`: also time each original and result after writing, as `optimize --bench`
      does (`{"providers": "cpu", "runs": 30}`); such tasks never run beside another timing
      task.
    Returns a FleetReport; a failed model is in it (and in the manifest) with its error line.
    Raises UsageError for a pattern that matches nothing or an option `optimize` lacks.
    """
    start = time.perf_counter()
    if retries < 0:
        raise UsageError(f"retries must be >= 0, not {retries}")
    normalized = normalize_options(options)
    models = expand_patterns(patterns)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{out}: cannot create the output folder ({exc.strerror or exc})"
        ) from None
    manifest = out / MANIFEST
    local = LocalPoolBackend(workers) if backend is None else None
    runner: Backend = backend if backend is not None else LocalPoolBackend(workers)
    workers = getattr(runner, "workers", None) or workers or 1
    cpus = max(1, available_cpus() // workers)
    done_before: dict[str, dict[str, Any]] = {}
    for record in read_manifest(manifest):
        if record.get("status") == "ok" and isinstance(record.get("key"), dict):
            done_before[_key_id(record["key"])] = record

    names = output_names(models)
    records: dict[str, dict[str, Any]] = {}
    tasks: list[FleetTask] = []
    for model in models:
        output = out / names[model]
        try:
            sha = file_sha256(model)
        except OSError as exc:
            raise UsageError(f"{model}: cannot read ({exc.strerror or exc})") from None
        key = task_key(sha, normalized, bench)
        previous = done_before.get(_key_id(key))
        if _done_before(previous, output):
            assert previous is not None
            record = {**previous, "status": "skipped", "model": str(model), "output": str(output)}
            records[str(model)] = record
            if progress is not None:
                progress(record)
            continue
        tasks.append(FleetTask(str(model), str(output), normalized, 0, cpus, key, bench))

    shared = _shipped_data(runner, normalized) if tasks else {}
    if shared:
        tasks = [replace(task, shared=shared) for task in tasks]
    while tasks:
        failed: list[FleetTask] = []
        for task, result in runner.map_unordered(
            run_task,
            tasks,
            cpus_per_item=cpus,
            exclusive=_task_exclusive,
            retries=retries,
        ):
            record = result if isinstance(result, dict) else _failure_record(task, result)
            record = {**record, "key": task.key, "options": task.options}
            if record["status"] != "ok" and task.attempt < retries and isinstance(result, dict):
                logger.info("%s failed (%s); retrying", task.model, record.get("error"))
                failed.append(replace(task, attempt=task.attempt + 1))
                continue
            record["attempts"] = task.attempt + 1
            record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            append_manifest(manifest, record)
            records[task.model] = record
            if progress is not None:
                progress(record)
        tasks = sorted(failed, key=lambda t: t.model)
    if local is not None:
        local.close()
    ordered = [records[str(m)] for m in models]
    return FleetReport(
        records=ordered,
        out_dir=out,
        manifest=manifest,
        seconds=time.perf_counter() - start,
        workers=workers,
        backend=type(runner).__name__,
    )
