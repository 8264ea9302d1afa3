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

.PHONY: demo test bench clean FORCE triton-matrix triton-leg cuda-extension

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

# ---------------------------------------------------------------- the triton matrix (CI)
# Every supported triton (README "Supported stacks"): `make test` runs the newest; each leg here
# runs the AOT compile test (sm_80 + sm_90) under an older one and, under the oldest, the
# interpreter parity suites too (its interpreter needs numpy < 2.4). One leg alone:
# `make triton-leg TRITON=3.6.0`. Each leg has its venv, .venv-triton-<version>: TORCH_SPEC's
# torch plus that triton, made once.
TRITON_MATRIX ?= 3.6.0 3.7.1 3.8.0
TRITON_OLDEST := 3.6.0
TRITON ?= $(TRITON_OLDEST)
LEG_VENV := .venv-triton-$(TRITON)
LEG_NUMPY := $(if $(filter $(TRITON_OLDEST),$(TRITON)),numpy<2.4,numpy)
LEG_TESTS := tests/test_triton_aot.py $(if $(filter $(TRITON_OLDEST),$(TRITON)),$(filter-out tests/test_triton_aot.py,$(wildcard tests/test_triton_*.py)))

$(LEG_VENV)/.installed: setup.py
	test -x $(LEG_VENV)/bin/python || $(PYTHON) -m venv $(LEG_VENV)
	$(LEG_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "triton==$(TRITON)" "$(LEG_NUMPY)" pytest setuptools
	$(LEG_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

triton-leg: $(LEG_VENV)/.installed
	@echo "== triton $(TRITON): $(LEG_TESTS)"
	$(LEG_VENV)/bin/python -m pytest -q $(LEG_TESTS)

# Runs every leg, even after one fails, then fails if any did.
triton-matrix:
	@failed=""; for version in $(TRITON_MATRIX); do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory triton-leg TRITON=$$version || failed="$$failed $$version"; \
	  echo "== triton $$version: $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "triton legs failed:$$failed"; exit 1; fi

# ---------------------------------------------------------------- the CUDA extension (CI)
# setup.py builds repa_fast._cuda against a CUDA torch (CUDA_TORCH_SPEC: torch 2.14.1 is a CUDA
# 13.0 build, on this machine's disk) with the local nvcc, no GPU needed; the test loads it and
# checks its ops' schemas. The venv (.venv-cuda, ~5.5 GB) is made once; the build runs each time.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda

$(CUDA_VENV)/.installed:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" numpy pytest setuptools ninja
	touch $@

cuda-extension: $(CUDA_VENV)/.installed
	CUDA_HOME=$(CUDA_HOME) REPA_FAST_BUILD_CUDA=1 $(CUDA_VENV)/bin/python -m pip install -q --no-deps \
	  --no-build-isolation -e .
	$(CUDA_VENV)/bin/python -m pytest -q tests/test_cuda_extension.py

clean:
	rm -rf $(VENV) .venv-triton-* $(CUDA_VENV) build *.egg-info bench_out .pytest_cache .benchmarks
