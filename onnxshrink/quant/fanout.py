"""Sensitivity candidates measured in worker processes: the ranking's fan-out (issue 13).

The budget's ranking (`onnxshrink.quant.budget.rank`) measures every unit alone: N independent
measurements, each a candidate built (Python, one core), an ONNX Runtime session made (graph
optimization, one core) and run on the reference's feeds, and the error summed (numpy).
`measure_all(measure, units, workers)` spreads them over `workers` worker processes
(`optimize --search-workers N`):

1. `measure` is a callable, unit -> error: a stage's job object holding the model, what
   building one candidate needs and the `ErrorReference` (its feeds and float outputs). A
   worker gets it once, not once per unit; a unit sends its name and gets one float back.
   How the job gets there is the start method's (5).
2. Each worker's sessions get `CPUs // workers` intra-op threads
   (`onnxshrink.engine.io.set_session_threads`): ORT ignores OMP_NUM_THREADS.
3. Units go out one at a time, so a worker that finishes early takes the next; the errors are
   put back in the units' order, so the ranking is the one a single process makes whenever
   the figures are (ORT's CPU kernels split work by output, not by the sums inside one, so
   the thread count does not change them on the models measured; the tests compare rankings).
4. A job that cannot be pickled, where workers are spawned, is measured in this process,
   with a log line saying why. A worker that dies ends the run with one line naming the
   option to lower.
5. Workers are forked where that is safe: on Linux, with no other Python thread alive in this
   process (a live progress bar's refresh thread could hold the console's lock across the
   fork, and a worker that logs would wait on it forever). A forked worker inherits the job
   and this process's imports, so it starts in well under a second. Anywhere else workers
   are spawned: each imports onnxshrink (2-4 s here) and unpickles the job from the pool's
   initializer. Measured on this 2-core machine with 2 workers against 1 process: the
   whole command's sensitivity phase 0.85x forked (ppocr-v4-rec's 33 candidates and
   nudenet-320n's, `bench/search_workers.py`); spawned, the ranking alone took 0.8-1.3x,
   start-up eating the gain.
   Garbage is collected before forking, so no dead ORT session is copied. The calibration
   workers (`--calibration-workers`) start the same way, spawned when they run on CUDA.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.context
import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from onnxshrink.errors import OnnxShrinkError, UsageError, first_line

logger = logging.getLogger(__name__)

Measure = Callable[[str], float]
Progress = Callable[[int, int], None]

#: the job of this worker process: inherited when forked (set by `_in_workers` just before,
#: cleared after), unpickled by `_start` when spawned
_JOB: Measure | None = None


def check_workers(workers: object, option: str = "--search-workers") -> int:
    """`workers` as a count of at least 1, or a UsageError naming `option`."""
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise UsageError(f"{option} {workers}: must be at least 1")
    return workers


def measure_all(
    measure: Measure,
    units: Sequence[str],
    workers: int = 1,
    progress: Progress | None = None,
) -> list[float]:
    """`[measure(u) for u in units]`, in `workers` processes when more than one (docstring)."""
    check_workers(workers)
    units = list(units)
    workers = min(workers, len(units))
    if workers > 1:
        context = start_method()
        if context.get_start_method() == "fork":
            return _in_workers(context, measure, None, units, workers, progress)
        payload = _payload(measure)
        if payload is not None:
            return _in_workers(context, None, payload, units, workers, progress)
    errors = []
    for i, unit in enumerate(units):
        errors.append(measure(unit))
        if progress is not None:
            progress(i + 1, len(units))
    return errors


def start_method(cuda: bool = False) -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux, no other Python thread alive, no CUDA work in the
    workers: CUDA does not survive a fork), spawn elsewhere (docstring 5). Used by the
    calibration workers too (`onnxshrink.quant.calibration`, 14)."""
    if (
        not cuda
        and sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    ):
        gc.collect()  # no dead ORT session copied into the workers
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _payload(measure: Measure) -> bytes | None:
    """The pickled job, or None (logged) when it cannot be sent (docstring 4)."""
    try:
        return pickle.dumps(measure, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # pickling raises several types; each means "measure here"
        logger.warning(
            "search workers: %s cannot be sent to worker processes (%s); measured here",
            type(measure).__name__,
            first_line(exc),
        )
        return None


def _in_workers(
    context: multiprocessing.context.BaseContext,
    job: Measure | None,
    payload: bytes | None,
    units: list[str],
    workers: int,
    progress: Progress | None,
) -> list[float]:
    """The units measured in `workers` processes: a forked worker inherits `job`, a spawned
    one unpickles `payload` (docstring 5)."""
    global _JOB
    from onnxshrink.engine.io import available_cpus

    threads = max(1, available_cpus() // workers)
    errors: list[float | None] = [None] * len(units)
    done = 0
    if job is not None:
        # a forked worker inherits it: all are forked at the first submit (the pool starts
        # its management thread after them), and it is cleared once the pool is shut down
        _JOB = job
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start, initargs=(payload, threads)
    ) as pool:
        futures = {pool.submit(_measure, unit): i for i, unit in enumerate(units)}
        try:
            for future in as_completed(futures):
                errors[futures[future]] = future.result()
                done += 1
                if progress is not None:
                    progress(done, len(units))
        except BrokenProcessPool as exc:
            raise OnnxShrinkError(
                f"sensitivity: a worker process died ({first_line(exc)}); "
                "try fewer --search-workers"
            ) from None
        finally:
            for future in futures:
                future.cancel()
            _JOB = None
    logger.info(
        "sensitivity: %d candidate(s) in %d %s worker(s), %d thread(s) each",
        len(units),
        workers,
        "forked" if job is not None else "spawned",
        threads,
    )
    assert all(e is not None for e in errors), "a unit was not measured"
    return [float(e) for e in errors]  # type: ignore[arg-type]


def _start(payload: bytes | None, threads: int) -> None:
    """A worker's initializer: its share of the CPUs, and the job, unpickled once (a forked
    worker has it already)."""
    global _JOB
    from onnxshrink.engine.io import set_session_threads

    set_session_threads(threads)
    if payload is not None:
        _JOB = pickle.loads(payload)


def _measure(unit: str) -> float:
    assert _JOB is not None, "worker started without a job"
    return float(_JOB(unit))
