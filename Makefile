# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP_CORE := $(VENV)/.installed-core
STAMP_TEST := $(VENV)/.installed-test
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: demo test bench clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is installed first and pinned, so that no later requirement pulls a different (CUDA) build.
$(STAMP_CORE): $(PY) setup.cfg pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e . "$(TORCH_SPEC)"
	touch $@

$(STAMP_TEST): $(STAMP_CORE)
	$(PIP) install -q -e ".[test]" "$(TORCH_SPEC)"
	touch $@

# curvlinops is installed without its dependency backpack-for-pytorch's torchvision pin; see analysis/README.md.
$(STAMP_BENCH): $(STAMP_TEST)
	$(PIP) install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
	$(PIP) install -q einops einconv opt-einsum linear_operator "$(TORCH_SPEC)"
	touch $@

venv: $(STAMP_TEST)

demo: $(STAMP_CORE)
	$(VENV)/bin/hessian-tools demo --out reports/demo

test: $(STAMP_TEST)
	$(PY) -m pytest

bench: $(STAMP_BENCH)
	$(PY) analysis/bench_peers.py --out figures

clean:
	rm -rf $(VENV) build *.egg-info reports
