# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs the
# project with what it needs. TORCH_SPEC picks the torch build: the default takes the CPU wheel
# this machine keeps on disk; GPU users set e.g. TORCH_SPEC="torch" (a CUDA build). The spec
# torch was installed from is kept in .venv/.torch-spec: a different TORCH_SPEC reinstalls torch
# (so `make test TORCH_SPEC=torch` after `make demo` gets the CUDA build), the same one does not.
# `make bench` benchmarks on cuda when torch sees a GPU, else on cpu; DEVICE=cpu or cuda:N picks.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEVICE ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SPEC_FILE := $(VENV)/.torch-spec
TORCH_STAMP := $(VENV)/.torch-installed

.PHONY: demo test bench clean FORCE

# Rewritten only when TORCH_SPEC differs from the recorded one: then its newer time makes torch reinstall.
$(SPEC_FILE): FORCE
	@mkdir -p $(VENV)
	@test "$$(cat $@ 2>/dev/null)" = '$(TORCH_SPEC)' || printf '%s\n' '$(TORCH_SPEC)' > $@

$(TORCH_STAMP): $(SPEC_FILE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip uninstall -q -y torch
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(STAMP): setup.py $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

demo: $(STAMP)
	$(BIN)/repa-fast info
	$(BIN)/repa-fast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/repa-fast bench $(if $(DEVICE),--device $(DEVICE)) --quick --out bench_out

clean:
	rm -rf $(VENV) build *.egg-info bench_out .pytest_cache .benchmarks
