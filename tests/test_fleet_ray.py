"""The Ray backend of fleet mode (onnxshrink.fleet_ray) on a local two-CPU Ray instance.

One Ray start per module (it takes seconds); the whole module is skipped where ray is not
installed, except the test of the one-line error that a missing ray gives.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxshrink.errors import UsageError
from onnxshrink.fleet_ray import RAY_MISSING, RayBackend

# The functions below run in Ray workers: they are top-level, so that they pickle by reference.


def _square(n: int) -> int:
    return n * n


def _fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError("three is not welcome")
    return n


def _die_once(item: tuple[str, int]) -> int:
    """Kill the worker process on the first attempt at item 1 (a marker file remembers it)."""
    folder, n = item
    marker = Path(folder) / f"attempted-{n}"
    if n == 1 and not marker.exists():
        marker.write_text("x")
        os._exit(1)
    return n


def _record_interval(item: tuple[str, int]) -> int:
    """Sleep a little, writing this attempt's start and end times to a file."""
    folder, n = item
    start = time.time()
    time.sleep(0.4)
    (Path(folder) / f"interval-{n}").write_text(f"{start} {time.time()}")
    return n


def _record_interval_together(item: tuple[str, int]) -> int:
    """`_record_interval`, but each item first waits (up to 60 s) until the other item has
    started: run side by side they overlap for sure, whatever a worker process's start-up
    costs; run one after the other, the first gives up waiting and they do not."""
    folder, n = item
    Path(folder, f"{n}.started").write_text("")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(Path(folder).glob("*.started"))) < 2:
        time.sleep(0.05)
    return _record_interval(item)


def _sleep_unless_zero(n: int) -> int:
    if n:
        time.sleep(60)
    return n


@dataclasses.dataclass(frozen=True)
class _Job:
    data: Any
    index: int


def _use_shared(job: _Job) -> tuple[float, bool]:
    """Return what the task saw of the shared array: a figure, and whether it may write to it."""
    array = job.data["array"]
    return float(array.sum()) + job.index, bool(array.flags.writeable)


@pytest.fixture(scope="module")
def backend() -> Iterator[RayBackend]:
    pytest.importorskip("ray")
    with RayBackend(num_cpus=2) as started:
        yield started


def _intervals(folder: Path) -> list[tuple[float, float]]:
    spans = []
    for path in sorted(folder.glob("interval-*")):
        start, end = path.read_text().split()
        spans.append((float(start), float(end)))
    return spans


def _overlaps(spans: list[tuple[float, float]]) -> bool:
    return any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2))


def test_missing_ray_is_one_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(UsageError) as caught:
        RayBackend()
    assert str(caught.value) == RAY_MISSING
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("address", "num_cpus", "message"),
    [("localhost:6379", None, "use 'auto' or 'ray://HOST:PORT'"), ("auto", 2, "local Ray")],
)
def test_bad_arguments_are_usage_errors(address: str, num_cpus: int | None, message: str) -> None:
    pytest.importorskip("ray")
    with pytest.raises(UsageError, match=message):
        RayBackend(address=address, num_cpus=num_cpus)


def test_all_results_come_back(backend: RayBackend) -> None:
    results = dict(
        backend.map_unordered(
            _square, range(6), cpus_per_item=1, exclusive=lambda n: False, retries=0
        )
    )
    assert results == {n: n * n for n in range(6)}
    assert (
        list(
            backend.map_unordered(
                _square, [], cpus_per_item=1, exclusive=lambda n: False, retries=0
            )
        )
        == []
    )


def test_an_exception_is_that_items_result(backend: RayBackend) -> None:
    results = dict(
        backend.map_unordered(
            _fail_on_three, range(5), cpus_per_item=1, exclusive=lambda n: False, retries=2
        )
    )
    assert isinstance(results[3], ValueError)
    assert str(results[3]) == "three is not welcome"
    assert {n: r for n, r in results.items() if n != 3} == {0: 0, 1: 1, 2: 2, 4: 4}


def test_a_killed_worker_is_retried(backend: RayBackend, tmp_path: Path) -> None:
    items = [(str(tmp_path), n) for n in range(3)]
    results = dict(
        backend.map_unordered(
            _die_once, items, cpus_per_item=1, exclusive=lambda item: False, retries=1
        )
    )
    assert (tmp_path / "attempted-1").exists()  # the first attempt did die
    assert {n: r for (_, n), r in results.items()} == {0: 0, 1: 1, 2: 2}


def test_a_worker_dead_after_its_retries_is_that_items_exception(
    backend: RayBackend, tmp_path: Path
) -> None:
    import ray.exceptions

    items = [(str(tmp_path), n) for n in range(3)]
    results = dict(
        backend.map_unordered(
            _die_once, items, cpus_per_item=1, exclusive=lambda item: False, retries=0
        )
    )
    by_n = {n: r for (_, n), r in results.items()}
    assert isinstance(by_n[1], ray.exceptions.WorkerCrashedError)
    assert (by_n[0], by_n[2]) == (0, 2)


def test_exclusive_items_never_overlap(backend: RayBackend, tmp_path: Path) -> None:
    # control: without the exclusive resource, two CPUs run two items side by side, so the
    # overlap check below is able to fail
    free = tmp_path / "free"
    free.mkdir()
    items = [(str(free), n) for n in range(2)]
    list(
        backend.map_unordered(
            _record_interval_together,
            items,
            cpus_per_item=1,
            exclusive=lambda i: False,
            retries=0,
        )
    )
    assert _overlaps(_intervals(free))

    alone = tmp_path / "alone"
    alone.mkdir()
    items = [(str(alone), n) for n in range(3)]
    done = list(
        backend.map_unordered(
            _record_interval, items, cpus_per_item=1, exclusive=lambda i: True, retries=0
        )
    )
    assert sorted(r for _, r in done) == [0, 1, 2]
    spans = _intervals(alone)
    assert len(spans) == 3
    assert not _overlaps(spans)
    assert backend.warnings == []


def test_without_timing_resource_exclusive_items_run_one_at_a_time(
    backend: RayBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "_timing_slots", 0)  # a cluster whose nodes lack the resource
    monkeypatch.setattr(backend, "warnings", [])
    items = [(str(tmp_path), n) for n in range(3)]
    done = list(
        backend.map_unordered(
            _record_interval, items, cpus_per_item=1, exclusive=lambda i: True, retries=0
        )
    )
    assert sorted(r for _, r in done) == [0, 1, 2]
    assert not _overlaps(_intervals(tmp_path))
    assert len(backend.warnings) == 1
    assert "onnxshrink_timing" in backend.warnings[0]


def test_a_shared_object_is_put_once(backend: RayBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    puts: list[object] = []
    real_put = backend._ray.put

    def counting_put(obj: object, **kwargs: Any) -> Any:
        puts.append(obj)
        return real_put(obj, **kwargs)

    monkeypatch.setattr(backend._ray, "put", counting_put)
    array = np.arange(200_000, dtype=np.float64)  # 1.6 MB: well above Ray's inline limit
    ref = backend.put_shared(array)
    jobs = [_Job({"array": ref}, n) for n in range(4)]
    done = list(
        backend.map_unordered(
            _use_shared, jobs, cpus_per_item=1, exclusive=lambda j: False, retries=0
        )
    )
    assert len(puts) == 1
    total = float(array.sum())
    assert sorted(result for _, result in done) == [(total + n, False) for n in range(4)]
    # not writeable: the task read the array in place from the object store, not from a copy
    # pickled with its arguments
    assert all(job.data["array"] is ref for job, _ in done)  # the items come back as given


def test_closing_the_iterator_cancels_the_pending_tasks(backend: RayBackend) -> None:
    results = backend.map_unordered(
        _sleep_unless_zero, range(3), cpus_per_item=1, exclusive=lambda n: False, retries=0
    )
    assert next(results) == (0, 0)
    results.close()  # the two 60-second tasks are cancelled, which frees both CPUs
    start = time.time()
    again = list(
        backend.map_unordered(
            _square, range(2), cpus_per_item=1, exclusive=lambda n: False, retries=0
        )
    )
    assert sorted(again) == [(0, 0), (1, 1)]
    assert time.time() - start < 30


def test_a_task_no_node_can_hold_is_refused(backend: RayBackend) -> None:
    with pytest.raises(UsageError, match="3 CPUs"):
        list(
            backend.map_unordered(
                _square, [1], cpus_per_item=3, exclusive=lambda n: False, retries=0
            )
        )


def test_optimize_many_on_ray_matches_optimize_alone(backend: RayBackend, tmp_path: Path) -> None:
    """`optimize-many --ray`: outputs byte-identical to `optimize` run on each model alone, and a
    manifest; Ray is already up here (the module's backend), so the command joins it."""
    import onnx
    from typer.testing import CliRunner

    from onnxshrink import optimize
    from onnxshrink.cli import app
    from onnxshrink.fleet import file_sha256, read_manifest
    from tests.test_fleet import _net

    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        onnx.save(_net(i), folder / f"net{i}.onnx")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["optimize-many", str(folder / "*.onnx"), "--out", str(out), "--ray", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    for i in range(3):
        alone = tmp_path / f"alone{i}.onnx"
        optimize(folder / f"net{i}.onnx", alone)
        assert file_sha256(out / f"net{i}.opt.onnx") == file_sha256(alone)
    records = list(read_manifest(out / "manifest.jsonl"))
    assert sorted(Path(r["model"]).name for r in records) == ["net0.onnx", "net1.onnx", "net2.onnx"]
    assert all(r["status"] == "ok" for r in records)


def test_optimize_many_on_ray_ships_the_calibration_data(
    backend: RayBackend, tmp_path: Path
) -> None:
    """With --calibration-data, the .npz goes through Ray's object store once and every task
    calibrates from its copy, to the bytes `optimize` writes alone."""
    import onnx
    from typer.testing import CliRunner

    from onnxshrink import optimize
    from onnxshrink.cli import app
    from onnxshrink.fleet import file_sha256, read_manifest
    from tests.test_fleet import _net

    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(2):
        onnx.save(_net(i), folder / f"net{i}.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    out = tmp_path / "out"
    args = ["--quantize", "int8", "--calibration-data", str(calib), "--no-speed-check"]
    result = CliRunner().invoke(
        app, ["optimize-many", str(folder / "*.onnx"), "--out", str(out), "--ray", *args]
    )
    assert result.exit_code == 0, result.output
    records = list(read_manifest(out / "manifest.jsonl"))
    assert len(records) == 2 and all(r["shipped"] == ["calibration_data"] for r in records)
    for i in range(2):
        alone = tmp_path / f"alone{i}.onnx"
        optimize(
            folder / f"net{i}.onnx",
            alone,
            quantize="int8",
            calibration_data=str(calib),
            check_speed=False,
        )
        assert file_sha256(out / f"net{i}.opt.onnx") == file_sha256(alone)
