"""Fleet mode (`onnxshrink.fleet`, `onnxshrink optimize-many`): outputs identical to `optimize`
run alone, the manifest and reruns, failures and dead workers, exclusive timing tasks, and the
ORT thread count each task sets."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner

from onnxshrink import optimize
from onnxshrink.cli import app
from onnxshrink.engine import io as engine_io
from onnxshrink.errors import UsageError
from onnxshrink.fleet import (
    KILL_ALWAYS_ENV,
    KILL_ONCE_ENV,
    LocalPoolBackend,
    _task_exclusive,
    file_sha256,
    needs_machine_alone,
    normalize_options,
    optimize_many,
    output_names,
    read_manifest,
)
from tests.helpers import make_model

runner = CliRunner()


def _net(seed: int) -> onnx.ModelProto:
    """x [N, 8] -> MatMul -> Identity -> Add(0) -> Relu -> y: rules to apply, weights of `seed`."""
    rng = np.random.default_rng(seed)
    return make_model(
        """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8] x) => (float[N, 4] y) {
    h = MatMul(x, w)
    i = Identity(h)
    a = Add(i, zero)
    y = Relu(a)
}""",
        {
            "w": rng.normal(size=(8, 4)).astype(np.float32),
            "zero": np.zeros(4, np.float32),
        },
    )


@pytest.fixture
def models(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        onnx.save(_net(i), folder / f"net{i}.onnx")
    return folder


class RecordingBackend:
    """Runs items in this process, in order, recording what it was asked to run."""

    workers = 1

    def __init__(self) -> None:
        self.items: list = []

    def map_unordered(self, fn, items, *, cpus_per_item, exclusive, retries):
        for item in items:
            self.items.append(item)
            yield item, fn(item)


def test_outputs_are_byte_identical_to_optimize_alone(models, tmp_path):
    options = {"opset": 17, "seed": 3}
    report = optimize_many([str(models / "*.onnx")], tmp_path / "out", options, workers=2)
    assert report.counts == {"ok": 3, "skipped": 0, "failed": 0}
    for i in range(3):
        alone = tmp_path / f"alone{i}.onnx"
        optimize(models / f"net{i}.onnx", alone, **options)
        fleet_out = tmp_path / "out" / f"net{i}.opt.onnx"
        assert file_sha256(fleet_out) == file_sha256(alone)
        record = report.records[i]
        assert record["output_sha256"] == file_sha256(alone)
        assert record["nodes_before"] == 4 and record["nodes_after"] < 4
        assert record["parity"]["verified"]


def test_manifest_is_written_and_a_rerun_skips_every_model(models, tmp_path):
    out = tmp_path / "out"
    first = optimize_many([str(models / "*.onnx")], out, {"opset": 17}, workers=2)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert {r["status"] for r in records} == {"ok"}
    for r in records:
        assert set(r["key"]) == {"model_sha256", "options_hash", "onnxshrink", "onnxruntime"}
        assert r["key"]["model_sha256"] == file_sha256(r["model"])
        assert r["key"]["onnxruntime"] == ort.__version__
        assert r["output_sha256"] == file_sha256(r["output"])
    backend = RecordingBackend()
    start = time.perf_counter()
    again = optimize_many([str(models / "*.onnx")], out, {"opset": 17}, backend=backend)
    assert time.perf_counter() - start < 5
    assert backend.items == []
    assert [r["status"] for r in again.records] == ["skipped"] * 3
    assert [r["output_sha256"] for r in again.records] == [
        r["output_sha256"] for r in first.records
    ]
    assert len(read_manifest(out / "manifest.jsonl")) == 3  # skipped models add no line


def test_a_rerun_runs_again_what_changed(models, tmp_path):
    out = tmp_path / "out"
    optimize_many([str(models / "*.onnx")], out, {"opset": 17}, backend=RecordingBackend())
    (out / "net0.opt.onnx").write_bytes(b"changed by hand")  # the output no longer matches
    (out / "net1.opt.onnx").unlink()  # the output is gone
    backend = RecordingBackend()
    optimize_many([str(models / "*.onnx")], out, {"opset": 17}, backend=backend)
    assert sorted(Path(t.model).name for t in backend.items) == ["net0.onnx", "net1.onnx"]
    backend = RecordingBackend()
    optimize_many([str(models / "*.onnx")], out, {"opset": 17, "seed": 1}, backend=backend)
    assert len(backend.items) == 3  # other options: another key


def test_a_corrupt_model_is_reported_and_the_others_finish(models, tmp_path):
    (models / "bad.onnx").write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["optimize-many", str(models / "*.onnx"), "--out", str(out), "--workers", "2"],
    )
    assert result.exit_code == 1, result.output
    assert "FAILED bad.onnx" in result.output
    assert "ModelLoadError" in result.output
    assert "1 of 4 model(s) failed: bad.onnx" in result.output
    assert "Traceback" not in result.output
    for i in range(3):
        assert (out / f"net{i}.opt.onnx").is_file()
    records = {Path(r["model"]).name: r for r in read_manifest(out / "manifest.jsonl")}
    assert records["bad.onnx"]["status"] == "failed"
    assert records["bad.onnx"]["attempts"] == 2  # --retries 1 by default
    assert "\n" not in records["bad.onnx"]["error"]
    assert not (out / "bad.opt.onnx").exists()
    # a rerun runs the failed model again and skips the rest; the exit code is still 1
    result = runner.invoke(app, ["optimize-many", str(models / "*.onnx"), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.count("skipped net") == 3


def test_retries_zero_records_the_first_failure(models, tmp_path):
    (models / "bad.onnx").write_bytes(b"not an onnx model")
    report = optimize_many(
        [str(models / "bad.onnx")], tmp_path / "out", retries=0, backend=RecordingBackend()
    )
    assert report.records[0]["attempts"] == 1


def test_a_worker_killed_mid_task_is_retried_and_the_run_completes(models, tmp_path, monkeypatch):
    markers = tmp_path / "killed"
    markers.mkdir()
    monkeypatch.setenv(KILL_ONCE_ENV, str(markers))
    report = optimize_many([str(models / "*.onnx")], tmp_path / "out", workers=2)
    assert report.counts["ok"] == 3, report.records
    assert len(list(markers.iterdir())) == 3  # each model's first worker died


def test_a_worker_that_always_dies_fails_its_model_only(models, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_ALWAYS_ENV, "net1.onnx")
    report = optimize_many([str(models / "*.onnx")], tmp_path / "out", workers=2, retries=1)
    statuses = {Path(r["model"]).name: r["status"] for r in report.records}
    assert statuses == {"net0.onnx": "ok", "net1.onnx": "failed", "net2.onnx": "ok"}
    assert "worker process died" in report.records[1]["error"]
    assert read_manifest(tmp_path / "out" / "manifest.jsonl")[-1]["status"] in ("ok", "failed")


def test_a_task_that_raises_is_a_record(models, tmp_path, monkeypatch):
    # the marker folder is missing: writing the marker raises in the task, before optimize
    monkeypatch.setenv(KILL_ONCE_ENV, str(tmp_path / "absent"))
    report = optimize_many([str(models / "net0.onnx")], tmp_path / "out", workers=1)
    assert report.counts["failed"] == 1
    assert report.records[0]["error"].startswith("FileNotFoundError: ")


def _timed(item: tuple[str, int]) -> tuple[float, float]:
    """A task for the exclusive test: sleeps, returns its (start, end) wall times."""
    start = time.time()
    time.sleep(0.4)
    return start, time.time()


def test_exclusive_items_never_overlap():
    items = [("timing", i) for i in range(3)] + [("plain", i) for i in range(3)]
    results = dict(
        LocalPoolBackend(3).map_unordered(
            _timed,
            items,
            cpus_per_item=1,
            exclusive=lambda item: item[0] == "timing",
            retries=0,
        )
    )
    assert set(results) == set(items)
    spans = sorted(results[item] for item in items if item[0] == "timing")
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, spans
    # the pool was used: a plain item ran beside a timing one (the timing items alone take
    # 1.2 s one after another, however slowly the pool's processes start)
    plain = [results[item] for item in items if item[0] == "plain"]
    assert any(p0 < t1 and t0 < p1 for p0, p1 in plain for t0, t1 in spans)


def test_bench_times_each_model_alone(models, tmp_path):
    report = optimize_many(
        [str(models / "net0.onnx")], tmp_path / "out", bench={"providers": "cpu", "runs": 3}
    )
    record = report.records[0]
    assert record["status"] == "ok", record
    roles = [row["role"] for row in record["bench"]["rows"]]
    assert roles == ["original", "result"]
    assert record["bench"]["rows"][1]["p50_ms"] > 0
    # timing settings are part of the key: without --bench the model runs again
    backend = RecordingBackend()
    optimize_many([str(models / "net0.onnx")], tmp_path / "out", backend=backend)
    assert len(backend.items) == 1
    assert not _task_exclusive(backend.items[0])


def test_int8_speed_check_and_bench_need_the_machine_alone():
    assert needs_machine_alone({"quantize": "int8"})
    assert needs_machine_alone({"quantize": "int8+int4"})
    assert not needs_machine_alone({"quantize": "int8", "check_speed": False})
    assert not needs_machine_alone({"quantize": "int8", "target": "tensorrt"})
    assert not needs_machine_alone({"quantize": "int4"})
    assert not needs_machine_alone({})
    assert needs_machine_alone({"bench": True})


def test_the_thread_setting_reaches_every_session_options(tmp_path):
    from onnxshrink.bench import _session_options
    from onnxshrink.verify.parity import ort_session

    model = _net(0)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    engine_io.set_session_threads(3)
    try:
        session = engine_io.inference_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])
        assert session.get_session_options().intra_op_num_threads == 3
        session = ort_session(model.SerializeToString())
        assert session.get_session_options().intra_op_num_threads == 3
        session = ort_session(path)
        assert session.get_session_options().intra_op_num_threads == 3
        # an explicit count (bench --threads 1) is kept
        options = engine_io.apply_session_threads(_session_options(1))
        assert options.intra_op_num_threads == 1
        assert engine_io.apply_session_threads(_session_options(None)).intra_op_num_threads == 3
    finally:
        engine_io.set_session_threads(None)
    session = engine_io.inference_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert session.get_session_options().intra_op_num_threads == 0


def test_each_task_sets_its_share_of_the_cpus(models, tmp_path, monkeypatch):
    monkeypatch.setattr("onnxshrink.fleet.available_cpus", lambda: 8)
    report = optimize_many([str(models / "net0.onnx")], tmp_path / "out", workers=2)
    assert report.records[0]["threads"] == 4
    assert report.records[0]["cpus"] == 4


def test_a_pattern_that_matches_nothing_is_named(models, tmp_path):
    with pytest.raises(UsageError, match="nothing/\\*.onnx: no model file matches"):
        optimize_many([str(models / "*.onnx"), "nothing/*.onnx"], tmp_path / "out")
    result = runner.invoke(app, ["optimize-many", "nothing/*.onnx", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nothing/*.onnx: no model file matches" in result.output


def test_options_are_checked_and_canonical():
    assert normalize_options({"seed": 0, "opset": 17}) == {"opset": 17}
    assert normalize_options({"exclude": ()}) == {}
    with pytest.raises(UsageError, match="'output'"):
        normalize_options({"output": "x.onnx"})
    with pytest.raises(UsageError, match="'no_such'"):
        normalize_options({"no_such": 1})


def test_patterns_are_sorted_and_deduplicated_and_clashing_stems_resolved(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        onnx.save(_net(0), tmp_path / folder / "m.onnx")
    onnx.save(_net(1), tmp_path / "a" / "z.onnx")
    backend = RecordingBackend()
    report = optimize_many(
        [str(tmp_path / "b" / "*.onnx"), str(tmp_path / "*" / "*.onnx")],
        tmp_path / "out",
        backend=backend,
    )
    assert [Path(r["model"]).relative_to(tmp_path).as_posix() for r in report.records] == [
        "a/m.onnx",
        "a/z.onnx",
        "b/m.onnx",
    ]
    names = [Path(r["output"]).name for r in report.records]
    assert names[1] == "z.opt.onnx"
    assert names[0] != names[2] and names[0].startswith("m.") and names[2].startswith("m.")
    # deterministic: the same name whatever else is in the run
    alone = output_names([tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"])
    assert alone[tmp_path / "a" / "m.onnx"] == names[0]


def test_every_optimize_option_is_carried_or_named():
    from onnxshrink.cli.fleet import NOT_CARRIED, bench_settings, optimize_kwargs

    commands = typer.main.get_command(app).commands
    carried = {p.name for p in commands["optimize-many"].params}
    for param in commands["optimize"].params:
        assert param.name in carried or param.name in NOT_CARRIED, param.name
    defaults = {p.name: p.default for p in commands["optimize-many"].carried}
    assert bench_settings(defaults) is None  # takes the --bench* options out
    normalize_options(optimize_kwargs(defaults))  # every other one maps to optimize's


def test_cli_options_reach_optimize(models, tmp_path, monkeypatch):
    seen = {}

    def fake_many(patterns, out_dir, options, **kwargs):
        seen.update(options)
        seen["(bench)"] = kwargs["bench"]
        raise UsageError("stop here")

    monkeypatch.setattr("onnxshrink.fleet.optimize_many", fake_many)
    result = runner.invoke(
        app,
        [
            "optimize-many",
            str(models / "*.onnx"),
            "--out",
            str(tmp_path / "out"),
            "--opset",
            "17",
            "--input-shape",
            "x:2,8",
            "--no-verify",
            "--quantize",
            "int8",
            "--calibration-data",
            "random",
            "--no-speed-check",
            "--exclude",
            "Relu",
            "--bench",
            "--bench-runs",
            "5",
        ],
    )
    assert result.exit_code == 2, result.output
    assert seen["opset"] == 17
    assert seen["input_shapes"] == {"x": [2, 8]}
    assert seen["verify"] is False
    assert seen["check_speed"] is False
    assert seen["exclude"] == ["Relu"]
    assert seen["target"] == "ort-cpu"
    assert seen["(bench)"] == {"providers": "cpu", "runs": 5}
    assert "bench" not in seen and "bench_runs" not in seen


def test_lossy_options_without_a_lossy_stage_are_refused(models, tmp_path):
    result = runner.invoke(
        app,
        ["optimize-many", str(models / "*.onnx"), "--out", str(tmp_path), "--target", "tensorrt"],
    )
    assert result.exit_code == 2
    assert "--target: it needs --quantize or --sparsify" in result.output


def test_json_gives_the_whole_run(models, tmp_path):
    result = runner.invoke(
        app,
        ["optimize-many", str(models / "net0.onnx"), "--out", str(tmp_path / "o"), "--json", "-"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["command"] == "optimize-many"
    assert document["counts"] == {"ok": 1, "skipped": 0, "failed": 0}
    assert document["models"][0]["status"] == "ok"


@pytest.mark.skipif(
    importlib.util.find_spec("onnxshrink.fleet_ray") is not None, reason="Ray backend present"
)
def test_ray_without_the_backend_is_one_line(models, tmp_path):
    result = runner.invoke(
        app, ["optimize-many", str(models / "*.onnx"), "--out", str(tmp_path), "--ray"]
    )
    assert result.exit_code == 2
    assert "error: Ray backend not available" in result.output


def test_a_lossy_stage_gives_the_same_file_and_its_figures(models, tmp_path):
    options = {"quantize": "int8", "calibration_data": "random", "check_speed": False}
    report = optimize_many([str(models / "net*.onnx")], tmp_path / "out", options, workers=2)
    for i, record in enumerate(report.records):
        assert record["status"] == "ok", record
        assert record["lossy"]["stage"] == "int8"
        assert record["lossy"]["held_out_error"] is not None
        alone = tmp_path / f"alone{i}.onnx"
        optimize(models / f"net{i}.onnx", alone, **options)
        assert record["output_sha256"] == file_sha256(alone)


def test_a_file_bundle_recreates_a_file_and_a_folder(tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.arange(16, dtype=np.float32).reshape(2, 8))
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"{i:04d}.npz", x=np.full((1, 8), i, np.float32))
    from onnxshrink.fleet import FileBundle

    file_copy = Path(FileBundle.read(data).write(tmp_path / "there"))
    folder_copy = Path(FileBundle.read(folder).write(tmp_path / "there2"))
    assert file_copy.name == "calib.npz" and file_copy.read_bytes() == data.read_bytes()
    assert folder_copy.is_dir() and sorted(p.name for p in folder_copy.iterdir()) == [
        "0000.npz",
        "0001.npz",
    ]
    assert (folder_copy / "0001.npz").read_bytes() == (folder / "0001.npz").read_bytes()


def test_a_backend_with_an_object_store_gets_the_calibration_data_once(models, tmp_path):
    """A backend with `put_shared` (Ray) is given the .npz once; each task writes it where it
    runs and optimizes from there, to the same bytes as `optimize` alone."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))

    class StoreBackend(RecordingBackend):
        def __init__(self) -> None:
            super().__init__()
            self.puts: list = []

        def put_shared(self, obj):
            self.puts.append(obj)
            return obj

    backend = StoreBackend()
    options = {"quantize": "int8", "calibration_data": str(calib), "check_speed": False}
    report = optimize_many([str(models / "*.onnx")], tmp_path / "out", options, backend=backend)
    assert len(backend.puts) == 1 and backend.puts[0].files["calib.npz"] == calib.read_bytes()
    assert all(r["status"] == "ok" and r["shipped"] == ["calibration_data"] for r in report.records)
    for i in range(3):
        alone = tmp_path / f"alone{i}.onnx"
        optimize(models / f"net{i}.onnx", alone, **options)
        assert file_sha256(tmp_path / "out" / f"net{i}.opt.onnx") == file_sha256(alone)
