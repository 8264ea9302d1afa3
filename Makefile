# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs the
# project with what it needs. TORCH_SPEC picks the torch build: the default takes the CPU wheel
# this machine keeps on disk; GPU users set e.g. TORCH_SPEC="torch" (a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/repa-fast info
	$(BIN)/repa-fast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/repa-fast bench --device cpu --quick --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info bench_out .pytest_cache .benchmarks
