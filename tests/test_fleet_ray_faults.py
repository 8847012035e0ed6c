"""Fleet mode on Ray when a worker dies: `optimize_many` on a local Ray instance whose task
processes are killed mid-model (os._exit, through the test-only KILL_ONCE_ENV marker folder),
as a node's out-of-memory killer would. Ray retries each task and the run completes.

A module of its own: the environment variable must be set before Ray starts, since its worker
processes take their environment from the Ray instance, not from the test.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxshrink.fleet import KILL_ONCE_ENV, file_sha256, optimize_many, read_manifest
from tests.test_fleet import _net

ray = pytest.importorskip("ray")


def test_a_worker_killed_during_a_ray_run_is_retried(tmp_path: Path, monkeypatch) -> None:
    from onnxshrink import optimize
    from onnxshrink.fleet_ray import RayBackend

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process: its workers lack the marker")
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        onnx.save(_net(i), folder / f"net{i}.onnx")
    markers = tmp_path / "killed"
    markers.mkdir()
    monkeypatch.setenv(KILL_ONCE_ENV, str(markers))
    with RayBackend(num_cpus=2) as backend:
        backend.workers = 2
        report = optimize_many([str(folder / "*.onnx")], tmp_path / "out", backend=backend)
    monkeypatch.delenv(KILL_ONCE_ENV)
    assert report.counts["ok"] == 3, report.records
    assert len(list(markers.iterdir())) == 3  # each model's first worker process died
    assert len(read_manifest(tmp_path / "out" / "manifest.jsonl")) == 3
    for i in range(3):
        alone = tmp_path / f"alone{i}.onnx"
        optimize(folder / f"net{i}.onnx", alone)
        assert file_sha256(tmp_path / "out" / f"net{i}.opt.onnx") == file_sha256(alone)
