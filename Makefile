# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment .venv and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: demo test lint bench clean browser-deps test-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cxrlabel demo --out $(DEMO_DIR)

test: $(STAMP) browser-deps test-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# tests/test_browser.py drives Debian's chromium headless (Playwright, no browser download):
# install the package when it is missing, with sudo unless we are root.
browser-deps:
	@test -x /usr/bin/chromium || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends chromium; }

# The SR / secondary capture tests validate what they write with dciodvfy (Debian's
# dicom3tools): installed the same way when missing.
test-deps:
	@test -x /usr/bin/dciodvfy || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends dicom3tools; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_synth.py
	$(BIN)/python benchmarks/bench_loading.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_label.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_serve_soak.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
