"""A model over 2 GB through the whole `optimize` command: correct outputs and peak memory.

Usage: `.venv/bin/python bench/big_model.py [--gb 2.2] [--width 4096] [--dir DIR] [--keep]
[--modes lossless,int8]`

1. Builds an MLP of `width x width` float32 MatMul layers (each with a bias Add and a Relu)
   whose weights add up to `--gb` gigabytes, saved with external data (one `.data` file), as a
   large exported model is. The layers' weights are one random matrix, rolled and rescaled per
   layer so that no two are equal (identical weights would be merged by dedup-initializers and
   the test would shrink to one layer).
2. Runs the whole CLI, `onnxshrink optimize BIG.onnx -o OUT.onnx` (lossless) and with
   `--quantize int8 --calibration-data calib.npz` (Gaussian samples, the MLP's own input
   distribution; the held-out check uses a separate seed), each in its own process, and
   records the process's peak RSS (`ru_maxrss` of the child, from `os.wait4`).
3. Loads each result with ONNX Runtime and compares it with the original on held-out inputs:
   the largest relative error for lossless (bar 1e-4), the cosine of the outputs for int8.
4. Prints one row per run: exit status, wall time, output size, peak RSS and its ratio to the
   model's size (issue 9's goal: about 2x), and the check.

Needs about 3x the model's size free on disk (model, result, temporary files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402


def build_big_model(folder: Path, gigabytes: float, width: int, seed: int = 0) -> Path:
    """Write `big.onnx` + `big.onnx.data` into `folder`: an MLP whose weights total `gigabytes`.

    The weights are written straight to the data file, one layer at a time, so building a
    2 GB model never holds more than one layer in memory.
    """
    layer_bytes = width * width * 4
    layers = max(1, round(gigabytes * 1e9 / layer_bytes))
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
    model_path = folder / "big.onnx"
    data_name = "big.onnx.data"
    initializers: list[TensorProto] = []
    nodes = []
    offset = 0
    x = "x"
    with (folder / data_name).open("wb") as data:
        for i in range(layers):
            weight = np.roll(base, i, axis=1) * np.float32(1.0 + 0.01 * i) * np.float32(1.4)
            bias = (rng.standard_normal(width, dtype=np.float32) * 0.01).astype(np.float32)
            for name, array in ((f"w{i}", weight), (f"b{i}", bias)):
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
                raw = np.ascontiguousarray(array).tobytes()
                data.write(raw)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    tensor.external_data.add(key=key, value=value)
                offset += len(raw)
                initializers.append(tensor)
            nodes += [
                helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
                helper.make_node(
                    "Relu", [f"add{i}"], [f"h{i}" if i + 1 < layers else "y"], name=f"relu{i}"
                ),
            ]
            x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model_path.write_bytes(model.SerializeToString())
    return model_path


def model_bytes(path: Path) -> int:
    """The model file plus its external data files (every file that starts with its name)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """Run `cmd` as a child, reaping it with wait4 to read its own peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        pid = os.posix_spawnp(
            cmd[0],
            cmd,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
            ],
        )
        _, status, usage = os.wait4(pid, 0)
        log.seek(0)
        text = log.read()
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return code, seconds, usage.ru_maxrss * 1024, "\n".join(lines[-3:])


def compare(original: Path, result: Path, width: int, lossless: bool) -> str:
    """Largest relative error (lossless) or output cosine (int8) on held-out Gaussian inputs."""
    x = np.random.default_rng(12345).standard_normal((4, width), dtype=np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    ref = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    want = ref.run(None, {"x": x})[0]
    del ref
    got_session = ort.InferenceSession(str(result), options, providers=["CPUExecutionProvider"])
    got = got_session.run(None, {"x": x})[0]
    del got_session
    if lossless:
        rel = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
        return f"max rel err {rel:.2e} ({'ok' if rel <= 1e-4 else 'FAIL'})"
    a, b = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return f"cosine {cos:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weights in GB (default 2.2)")
    parser.add_argument("--width", type=int, default=4096, help="layer width (default 4096)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--modes", default="lossless,int8", help="lossless,int8 (default both)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="big-model-", dir=args.dir))
    cli = str(Path(sys.executable).with_name("onnxshrink"))
    try:
        t = time.perf_counter()
        path = build_big_model(folder, args.gb, args.width)
        size = model_bytes(path)
        print(f"built {path.name}: {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        calib = folder / "calib.npz"
        rng = np.random.default_rng(7)
        np.savez(calib, x=rng.standard_normal((32, args.width), dtype=np.float32))
        rows = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            out = folder / f"out-{mode}.onnx"
            cmd = [cli, "optimize", str(path), "-o", str(out)]
            if mode == "int8":
                cmd += ["--quantize", "int8", "--calibration-data", str(calib)]
            code, seconds, peak, tail = run_child(cmd)
            check = compare(path, out, args.width, mode == "lossless") if code == 0 else tail
            written = model_bytes(out) if out.exists() else 0
            rows.append((mode, code, seconds, written, peak, check))
            print(
                f"{mode:9s} exit {code}  {seconds:6.0f} s  out {written / 1e9:5.2f} GB  "
                f"peak RSS {peak / 1e9:5.2f} GB = {peak / size:4.2f}x model  {check}",
                flush=True,
            )
        return 0 if all(r[1] == 0 for r in rows) else 1
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
