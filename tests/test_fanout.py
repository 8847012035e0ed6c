"""The sensitivity ranking's fan-out (`--search-workers`, issue 13): candidates measured in
worker processes give the ranking, and the model, of one process (onnxshrink.quant.fanout)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.quant import fanout
from onnxshrink.quant.budget import rank
from onnxshrink.quant.fanout import check_workers, measure_all, start_method
from onnxshrink.quant.lossy import StageSettings
from tests.rules.test_float16 import _conv_net, _stage_feeds
from tests.rules.test_int8_budget import _feeds, _fragile_model, _ranges

runner = CliRunner()


class _Square:
    """A picklable job: unit "u7" -> 49.0, and the worker's pid on the side."""

    def __call__(self, unit: str) -> float:
        return float(int(unit[1:]) ** 2)


class _Pid:
    def __call__(self, unit: str) -> float:
        return float(os.getpid())


class _Refuses:
    def __call__(self, unit: str) -> float:
        if unit == "u2":
            raise UsageError(f"sensitivity: ORT cannot load {unit} alone: bad graph")
        return 0.0


class _Dies:
    def __call__(self, unit: str) -> float:
        os._exit(3)


@pytest.fixture(params=["fork", "spawn"])
def method(request, monkeypatch) -> str:
    """Each worker test under both start methods: forked (on Linux) and spawned (as on macOS
    and Windows). Forced, since other tests may leave a thread running, which would make
    `start_method` spawn."""
    if request.param == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("workers are forked on Linux only")
    context = multiprocessing.get_context(str(request.param))
    monkeypatch.setattr(fanout, "start_method", lambda cuda=False: context)
    return str(request.param)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux only")
def test_workers_are_forked_only_while_no_other_thread_runs(monkeypatch) -> None:
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert start_method().get_start_method() == "fork"
    assert start_method(cuda=True).get_start_method() == "spawn"  # CUDA does not survive a fork
    monkeypatch.setattr(threading, "active_count", lambda: 2)  # e.g. a progress bar's refresh
    assert start_method().get_start_method() == "spawn"


def test_the_rule_reads_the_threads_really_running() -> None:
    before = start_method().get_start_method()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method().get_start_method() == "spawn"
    finally:
        stop.set()
        thread.join()
    assert start_method().get_start_method() == before


def test_workers_give_the_errors_in_the_units_order_with_progress(method: str) -> None:
    units = [f"u{i}" for i in range(9)]
    seen: list[tuple[int, int]] = []
    got = measure_all(_Square(), units, workers=2, progress=lambda d, t: seen.append((d, t)))
    assert got == [float(i * i) for i in range(9)]
    assert seen == [(i, 9) for i in range(1, 10)]  # one line per unit, whichever finishes


def test_work_really_leaves_this_process(method: str) -> None:
    pids = measure_all(_Pid(), [f"u{i}" for i in range(6)], workers=2)
    assert os.getpid() not in pids
    assert measure_all(_Pid(), ["u0", "u1"], workers=1) == [float(os.getpid())] * 2


def test_a_job_that_cannot_be_pickled_is_measured_here_or_forked(method: str, caplog) -> None:
    values = {"a": 0.5, "b": 2.0}
    with caplog.at_level(logging.WARNING, logger="onnxshrink.quant.fanout"):
        got = measure_all(lambda u: values[u], ["a", "b"], workers=2)
    assert got == [0.5, 2.0]
    # a forked worker inherits the job: it need not be pickled
    assert ("cannot be sent to worker processes" in caplog.text) == (method == "spawn")
    assert fanout._JOB is None  # not kept alive in this process


def test_a_workers_error_reaches_the_caller_as_its_one_line(method: str) -> None:
    with pytest.raises(UsageError, match="ORT cannot load u2 alone"):
        measure_all(_Refuses(), [f"u{i}" for i in range(4)], workers=2)


def test_a_dead_worker_ends_the_run_with_one_line_naming_the_option(method: str) -> None:
    with pytest.raises(OnnxShrinkError, match="worker process died.*--search-workers"):
        measure_all(_Dies(), ["u0", "u1"], workers=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_worker_count_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(UsageError, match="--search-workers"):
        check_workers(bad)


def test_rank_in_workers_is_rank_in_one_process() -> None:
    units = [f"u{i}" for i in (3, 1, 4, 1, 5, 9, 2, 6)]
    assert rank(units, _Square(), workers=3) == rank(units, _Square())


def test_int8_ranking_in_workers_is_identical(method: str) -> None:
    from onnxshrink.rules.int8 import layer_sensitivity

    model = _fragile_model()
    ranges = _ranges(model)
    one = layer_sensitivity(model, ranges, _feeds())
    two = layer_sensitivity(model, ranges, _feeds(), workers=2)
    assert one == two and len(one) == 3  # names, ops and errors, exactly


def test_a_planned_stage_ranks_in_workers_with_the_same_result() -> None:
    """fp16 (a `PlannedStage`) under a budget tight enough to rank every node."""
    from onnxshrink.rules.float16 import STAGE

    model = _conv_net()
    feeds = _stage_feeds(model)
    full = STAGE.run(model, feeds, StageSettings(max_error=1.0)).budget.full_error
    one = STAGE.run(model, feeds, StageSettings(max_error=full / 4))
    two = STAGE.run(model, feeds, StageSettings(max_error=full / 4, search_workers=2))
    assert one.budget.ranking and one.budget.ranking == two.budget.ranking
    assert one.budget.sessions == two.budget.sessions
    assert one.model.SerializeToString() == two.model.SerializeToString()


def test_cli_search_workers_write_the_same_model(tmp_path) -> None:
    model = _fragile_model()
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(path))
    np.savez(calib, x=np.concatenate([f["x"] for f in _feeds()]))
    written = {}
    for workers in ("1", "2"):
        out = tmp_path / f"q{workers}.onnx"
        result = runner.invoke(
            app,
            [
                "optimize", str(path), "-o", str(out), "--quantize", "int8",
                "--calibration-data", str(calib), "--no-speed-check", "--max-error", "0.001",
                "--search-workers", workers,
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        written[workers] = out.read_bytes()
    assert written["1"] == written["2"]
    bad = runner.invoke(app, ["optimize", str(path), "--search-workers", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
