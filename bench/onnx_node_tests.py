"""ONNX's own backend node tests through the whole `onnxshrink optimize` command (issue 9, 10).

    .venv/bin/python bench/onnx_node_tests.py                        # all 1,765 tests (onnx 1.22.0)
    .venv/bin/python bench/onnx_node_tests.py --tests 'affine_grid|^test_range'   # regex on names
    .venv/bin/python bench/onnx_node_tests.py --sample 200 --seed 0  # a seeded random subset
    .venv/bin/python bench/onnx_node_tests.py --json node.json --keep out/node    # records, files

1. The tests. onnx 1.22.0 is the newest wheel that ships its node tests (1.23 ships none): each
   is `onnx/backend/test/data/node/NAME/model.onnx` (one operator, or its function expanded
   into primitive ops for the `_expanded` variants) with `test_data_set_0/input_K.pb` and
   `output_K.pb`. The wheel is fetched once with `pip download --no-deps` into models/cache/
   (models/fetch.py's `download_wheel`; it is never installed) and the tests are read from it
   with zipfile into a work folder (`--keep DIR`, else a temporary one). Tests run sorted by
   name; `--sample N` picks N of them with `random.Random(--seed)`, so a subset is reproducible.
2. The inputs. `input_K.pb` goes to the K-th graph input (initializers left out), as onnx's
   backend runner matches them, and all of them into one `inputs.npz`, one array per input,
   exactly as stored: no batch axis is added. `--inputs` feeds each array whole, except that
   it cuts arrays along axis 0 into runs of `--calibration-batch` samples where the model's
   axis 0 is dynamic; the command gets a `--calibration-batch` larger than any test so that
   every run sees exactly the test's tensors. Strings are stored as numpy unicode arrays (an
   .npz of Python objects is refused). A test whose inputs an .npz cannot hold (sequences,
   optionals) or ONNX Runtime cannot take from numpy (bfloat16, float8, int4 and the like) is
   `skipped`.
3. The command. `python -m onnxshrink optimize model.onnx -o out.onnx --inputs inputs.npz
   --seed 0` in a child process with this interpreter and this checkout on PYTHONPATH, at
   most `--timeout` seconds; `--jobs` tests at once.
4. The judge. A checker child per job (kept across tests, restarted when ONNX Runtime takes it
   down or it passes `--timeout`) runs the original and the result with ONNX Runtime CPU on
   the test's inputs and compares each with the expected outputs `output_K.pb` at the
   tolerance of onnx's backend runner: `|got - expected| <= 1e-7 + 1e-3 * |expected|`
   elementwise for floats, NaN equal to NaN; integers, bools and strings exactly; dtypes and
   shapes must agree; sequences element by element.
5. Outcomes, the first that applies:

   | outcome | meaning | clean |
   |---|---|---|
   | crash | the command timed out, printed a Python traceback, or exited other than 0, 1, 2 | no |
   | skipped | case 2: inputs an .npz cannot give ONNX Runtime | yes |
   | original-fails | ORT cannot load or run the original; exit 1 or 2, nothing written | yes |
   | declined | exit 1 although ORT runs the original: parity or loadability refused the result | yes |
   | internal-error | exit 1 with an "internal error" line (a rule or pass raised) | no |
   | refused | exit 2 although ORT runs the original on these inputs | no |
   | unverified | exit 0 although ORT cannot run the original (exit 0 must mean verified) | no |
   | no-output | exit 0 and no file | no |
   | unloadable | written; ORT cannot load it, and loads the original | no |
   | fails-to-run | written, loads; fails on the inputs where the original runs | no |
   | wrong | written; outputs off the expected ones where the original's are right, or off the original's where those are off too | no |
   | exact | written, outputs equal to the expected ones, the model rewritten | yes |
   | unchanged | written, outputs equal to the expected ones, op types and initializer count as before | yes |
   | as-original | written, outputs equal to the original's, which ORT itself gets off the expected | yes |

   Prints a table of counts, then one line per test that is neither exact, unchanged nor
   skipped; `--json PATH` writes every test's record. Exit status 1 when any test is not
   clean, else 0.

Measured on all 1,765 (2 shared cores, 17 min 41 s): 344 exact, 1,157 unchanged, 19
as-original, 78 original-fails, 167 skipped, nothing else (bench/README.md has the details).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ONNX_VERSION = "1.22.0"
NODE_PREFIX = "onnx/backend/test/data/node/"
#: the tolerance of onnx's backend runner (onnx/backend/test/runner)
RTOL, ATOL = 1e-3, 1e-7
#: larger than any node test's axis 0, so that --inputs never cuts a test's arrays (case 2)
WHOLE_BATCH = 1 << 30

OUTCOMES: dict[str, bool] = {  # outcome -> clean, in the order of the table
    "exact": True,
    "unchanged": True,
    "as-original": True,
    "original-fails": True,
    "declined": True,
    "skipped": True,
    "internal-error": False,
    "refused": False,
    "unverified": False,
    "no-output": False,
    "unloadable": False,
    "fails-to-run": False,
    "wrong": False,
    "crash": False,
}


@dataclass
class Record:
    """One test's outcome and what led to it."""

    test: str
    outcome: str = ""
    detail: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    original: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The tests (case 1)


def node_tests(wheel: Path) -> list[str]:
    """Names of the node tests the wheel ships (those with a model and test_data_set_0)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    models = {n[len(NODE_PREFIX) :].split("/")[0] for n in names if n.endswith("/model.onnx")}
    data = {
        n[len(NODE_PREFIX) :].split("/")[0]
        for n in names
        if n.startswith(NODE_PREFIX) and "/test_data_set_0/" in n
    }
    return sorted((models & data) - {""})


def extract_tests(wheel: Path, tests: list[str], dest: Path) -> None:
    """Extract each test's model.onnx and test_data_set_0 into dest/NAME/."""
    wanted = set(tests)
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(NODE_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(NODE_PREFIX) :]
            name, _, rest = rel.partition("/")
            if name not in wanted or not (
                rest == "model.onnx" or rest.startswith("test_data_set_0/")
            ):
                continue
            target = dest / name / rest
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)


# ---------------------------------------------------------------------------------------------
# The judge (cases 2 and 4), run in a checker child


class Skip(Exception):
    """A test this bench cannot feed through an .npz (case 2)."""


def _graph_inputs(model: Any) -> list[Any]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _read_value(path: Path, value_type: Any) -> Any:
    """A .pb of test data as numpy: an array, a list (sequence) or None (empty optional)."""
    import onnx
    from onnx import numpy_helper

    kind = value_type.WhichOneof("value")
    data = path.read_bytes()
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _plain(value: Any) -> Any:
    """Arrays of bytes (onnx's string tensors) as numpy unicode, as ORT returns strings."""
    import numpy as np

    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else str(s), otypes=[str])(
            value
        ).astype(str)
    return value


def load_inputs(test_dir: Path) -> dict[str, Any]:
    """The test's inputs by graph-input name, as numpy arrays an .npz holds; Skip otherwise."""
    import numpy as np
    import onnx

    model = onnx.load(test_dir / "model.onnx", load_external_data=False)
    feeds: dict[str, Any] = {}
    for k, value in enumerate(_graph_inputs(model)):
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise Skip(
                f"input {value.name} is a {kind.removesuffix('_type')}; an .npz holds tensors"
            )
        path = test_dir / "test_data_set_0" / f"input_{k}.pb"
        if not path.is_file():
            raise Skip(f"no input_{k}.pb for input {value.name}")
        array = _plain(_read_value(path, value.type))
        if array.dtype.kind not in "biufU" or array.dtype.itemsize == 0:
            raise Skip(f"input {value.name} is {array.dtype}, which ORT does not take from numpy")
        if array.dtype.kind == "f" and array.dtype not in (np.float16, np.float32, np.float64):
            raise Skip(f"input {value.name} is {array.dtype}, which ORT does not take from numpy")
        feeds[value.name] = array
    return feeds


def load_expected(test_dir: Path) -> list[Any]:
    """The expected outputs, by position of the graph outputs."""
    import onnx

    model = onnx.load(test_dir / "model.onnx", load_external_data=False)
    return [
        _plain(_read_value(test_dir / "test_data_set_0" / f"output_{k}.pb", value.type))
        for k, value in enumerate(model.graph.output)
    ]


def difference(expected: Any, got: Any, where: str = "") -> str | None:
    """Why `got` is not `expected` at the runner's tolerance (case 4); None when it is."""
    import numpy as np

    if expected is None or got is None:
        return None if expected is None and got is None else f"{where}: None vs a value"
    if isinstance(expected, list) or isinstance(got, list):
        if not (isinstance(expected, list) and isinstance(got, list)):
            return f"{where}: a sequence vs a tensor"
        if len(expected) != len(got):
            return f"{where}: {len(got)} elements, expected {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            reason = difference(e, g, f"{where}[{i}]")
            if reason:
                return reason
        return None
    e, g = np.asarray(_plain(expected)), np.asarray(_plain(got))
    if e.dtype.kind == "V" and g.dtype == np.uint8 and e.dtype.itemsize == 1:
        e = e.view(np.uint8)  # float8 (ml_dtypes): ORT gives its bits as uint8
    if e.dtype != g.dtype:
        return f"{where}: dtype {g.dtype}, expected {e.dtype}"
    if e.shape != g.shape:
        return f"{where}: shape {list(g.shape)}, expected {list(e.shape)}"
    if e.dtype.kind == "f":
        e64, g64 = e.astype(np.float64), g.astype(np.float64)
        nan = np.isnan(e64) | np.isnan(g64)
        if np.any(np.isnan(e64) != np.isnan(g64)):
            return f"{where}: NaN at other places"
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~nan & ~(e64 == g64) & ~(np.abs(g64 - e64) <= ATOL + RTOL * np.abs(e64))
        if np.any(bad):
            worst = float(np.nanmax(np.where(bad, np.abs(g64 - e64), 0.0)))
            return f"{where}: {int(bad.sum())} of {e.size} elements off (max abs diff {worst:.3g})"
        return None
    if not np.array_equal(e, g):
        return f"{where}: {int(np.sum(e != g))} of {e.size} elements differ"
    return None


def _outputs_difference(expected: list[Any], got: list[Any], names: list[str]) -> str | None:
    for name, e, g in zip(names, expected, got, strict=True):
        reason = difference(e, g, name)
        if reason:
            return reason
    return None


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _histogram(path: Path) -> tuple[list[tuple[str, int]], int]:
    """Op-type counts over every graph, and the number of initializers (for `unchanged`)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts: Counter[str] = Counter()
    initializers = 0

    def walk(graph: Any) -> None:
        nonlocal initializers
        initializers += len(graph.initializer)
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return sorted(counts.items()), initializers


class _Judge:
    """The checker child's state: the last test's inputs and the original's outputs."""

    def __init__(self) -> None:
        self.test: Path | None = None
        self.feeds: dict[str, Any] = {}
        self.expected: list[Any] = []
        self.original: list[Any] | None = None

    def original_run(self, test_dir: Path, npz: Path) -> dict[str, Any]:
        """Case 2 and the original's half of case 4: write the .npz, run the original."""
        import numpy as np

        self.test, self.original = test_dir, None
        try:
            self.feeds = load_inputs(test_dir)
        except Skip as exc:
            return {"skip": str(exc)}
        np.savez(npz, **self.feeds)
        self.expected = load_expected(test_dir)
        try:
            session = _session(test_dir / "model.onnx")
        except Exception as exc:
            return {"error": f"ORT cannot load it: {_first_line(exc)}", "stage": "load"}
        names = [o.name for o in session.get_outputs()]
        try:
            self.original = session.run(None, self.feeds)
        except Exception as exc:
            return {"error": f"ORT cannot run it: {_first_line(exc)}", "stage": "run"}
        return {"off_expected": _outputs_difference(self.expected, self.original, names)}

    def result_run(self, test_dir: Path, model: Path) -> dict[str, Any]:
        """The result's half of case 4."""
        if self.test != test_dir or self.original is None:
            self.original_run(test_dir, model.with_suffix(".again.npz"))
        report: dict[str, Any] = {
            "unchanged": _histogram(model) == _histogram(test_dir / "model.onnx")
        }
        try:
            session = _session(model)
        except Exception as exc:
            return {**report, "load_error": _first_line(exc)}
        names = [o.name for o in session.get_outputs()]
        try:
            got = session.run(None, self.feeds)
        except Exception as exc:
            return {**report, "run_error": _first_line(exc)}
        report["off_expected"] = _outputs_difference(self.expected, got, names)
        if self.original is not None:
            report["off_original"] = _outputs_difference(self.original, got, names)
        return report


def serve() -> None:
    """The checker child: one JSON request per stdin line, one JSON answer per stdout line."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of native code must not corrupt the answers
    judge = _Judge()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "original":
                answer = judge.original_run(Path(request["test"]), Path(request["npz"]))
            else:
                answer = judge.result_run(Path(request["test"]), Path(request["model"]))
        except Exception as exc:  # a bench bug or unreadable test data: reported, not fatal
            answer = {"judge_error": f"{type(exc).__name__}: {_first_line(exc)}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class Checker:
    """A checker child (`serve`) owned by one job; restarted when it dies or hangs."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The child's answer; {"judge_error": ...} when it died or passed the timeout."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=_child_env(),
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
            line = self.proc.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)
        died = self.proc.poll()
        self.close()
        return {
            "judge_error": f"ONNX Runtime ended the checker (status {died})"
            if died is not None
            else f"the checker passed {self.timeout:g} s"
        }

    def close(self) -> None:
        """End the child (this object's own process only)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------------------------
# The command and the verdict (cases 3 and 5)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_test(name: str, test_dir: Path, checker: Checker, timeout: float) -> Record:
    """Cases 2 to 5 for one test."""
    record = Record(name)
    start = time.perf_counter()
    npz, out = test_dir / "inputs.npz", test_dir / "out.onnx"
    original = checker.ask({"op": "original", "test": str(test_dir), "npz": str(npz)})
    record.original = original
    if "skip" in original:
        record.outcome, record.detail = "skipped", original["skip"]
        return record
    if "judge_error" in original:
        record.outcome, record.detail = "crash", f"judge: {original['judge_error']}"
        return record
    command = [
        sys.executable, "-m", "onnxshrink", "optimize", str(test_dir / "model.onnx"),
        "-o", str(out), "--inputs", str(npz), "--seed", "0",
        "--calibration-batch", str(WHOLE_BATCH),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=_child_env()
        )
    except subprocess.TimeoutExpired:
        record.outcome, record.detail = "crash", f"timed out after {timeout:g} s"
        record.seconds = time.perf_counter() - start
        return record
    record.exit_code = proc.returncode
    record.seconds = time.perf_counter() - start
    said = _last_line(proc.stderr) or _last_line(proc.stdout)
    original_fails = "error" in original
    if "Traceback (most recent call last)" in proc.stderr + proc.stdout or proc.returncode not in (
        0,
        1,
        2,
    ):
        record.outcome = "crash"
        record.detail = f"exit {proc.returncode}: {said}"
    elif proc.returncode in (1, 2):
        if original_fails:
            record.outcome, record.detail = "original-fails", original["error"]
        elif proc.returncode == 2:
            record.outcome, record.detail = "refused", said
        else:
            internal = "internal error" in said
            record.outcome, record.detail = ("internal-error" if internal else "declined"), said
    elif original_fails:
        record.outcome, record.detail = "unverified", f"exit 0, but {original['error']}"
    elif not out.is_file():
        record.outcome, record.detail = "no-output", said
    else:
        record.result = checker.ask({"op": "result", "test": str(test_dir), "model": str(out)})
        record.outcome, record.detail = _verdict(original, record.result)
    return record


def _verdict(original: dict[str, Any], result: dict[str, Any]) -> tuple[str, str]:
    """Case 5 for a written result."""
    if "judge_error" in result:
        return "crash", f"judge: {result['judge_error']}"
    if "load_error" in result:
        return "unloadable", result["load_error"]
    if "run_error" in result:
        return "fails-to-run", result["run_error"]
    original_off, off = original.get("off_expected"), result.get("off_expected")
    if off is None:
        return ("unchanged" if result.get("unchanged") else "exact"), ""
    if original_off is None:
        return "wrong", f"off the expected outputs where the original is right: {off}"
    if result.get("off_original") is None:
        return "as-original", f"ORT's own outputs are off the expected ones: {original_off}"
    return "wrong", f"off the original's outputs: {result['off_original']}"


# ---------------------------------------------------------------------------------------------
# Main


def _select(tests: list[str], pattern: str | None, sample: int | None, seed: int) -> list[str]:
    if pattern:
        regex = re.compile(pattern)
        tests = [t for t in tests if regex.search(t)]
    if sample is not None and sample < len(tests):
        tests = sorted(random.Random(seed).sample(tests, sample))
    return tests


def _run_all(
    tests: list[str], root: Path, jobs: int, timeout: float, verbose: bool
) -> Iterator[Record]:
    local = threading.local()
    checkers: list[Checker] = []
    lock = threading.Lock()

    def one(name: str) -> Record:
        checker = getattr(local, "checker", None)
        if checker is None:
            checker = local.checker = Checker(timeout)
            with lock:
                checkers.append(checker)
        return run_test(name, root / name, checker, timeout)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, name) for name in tests]
            for done, future in enumerate(as_completed(futures), 1):
                record = future.result()
                if verbose or not OUTCOMES[record.outcome]:
                    print(
                        f"[{done}/{len(tests)}] {record.test}: {record.outcome}"
                        + (f" ({record.detail})" if record.detail else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                elif done % 100 == 0:
                    print(f"[{done}/{len(tests)}]", file=sys.stderr, flush=True)
                yield record
    finally:
        for checker in checkers:
            checker.close()


def _print_table(records: list[Record], seconds: float, version: str) -> None:
    counts = Counter(r.outcome for r in records)
    print(f"ONNX node tests (onnx {version} wheel) through `onnxshrink optimize --inputs`:")
    print(f"{'outcome':<16}{'tests':>7}  clean")
    for outcome, clean in OUTCOMES.items():
        print(f"{outcome:<16}{counts.get(outcome, 0):>7}  {'yes' if clean else 'NO'}")
    print(f"{'total':<16}{len(records):>7}")
    print(f"wall time {seconds:.0f} s")
    listed = [r for r in records if r.outcome not in ("exact", "unchanged", "skipped")]
    if listed:
        print()
        print("tests that are neither exact, unchanged nor skipped:")
        for r in sorted(listed, key=lambda r: (list(OUTCOMES).index(r.outcome), r.test)):
            print(f"  {r.outcome:<15} {r.test}: {r.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--onnx-version", default=ONNX_VERSION, help="onnx wheel to take tests from"
    )
    parser.add_argument("--tests", help="regex: only tests whose name it finds")
    parser.add_argument("--sample", type=int, help="run a random subset of this many tests")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample")
    parser.add_argument("--jobs", type=int, default=2, help="tests at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    parser.add_argument("--keep", type=Path, help="work folder to keep (tests, inputs, results)")
    parser.add_argument("--json", type=Path, help="write every test's record here")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per test")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0

    from models.fetch import FetchError, download_wheel

    try:
        wheel = download_wheel("onnx", args.onnx_version)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tests = _select(node_tests(wheel), args.tests, args.sample, args.seed)
    if not tests:
        print(f"error: no node tests in {wheel.name} match", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnx-node-tests-"))
    try:
        extract_tests(wheel, tests, work)
        start = time.perf_counter()
        records = list(_run_all(tests, work, args.jobs, args.timeout, args.verbose))
        seconds = time.perf_counter() - start
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    records.sort(key=lambda r: r.test)
    _print_table(records, seconds, args.onnx_version)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    return 0 if all(OUTCOMES[r.outcome] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
