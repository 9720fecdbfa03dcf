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

# Peers for analysis/bench_peers.py (see analysis/README.md). pyhessian and hessian-eigenthings need
# only torch/numpy/scipy/tqdm. curvlinops-for-pytorch depends on backpack-for-pytorch, which pins
# torchvision (and with it another torch build); curvlinops imports backpack only in its experimental
# module, so both are installed with --no-deps and curvlinops' light pure-Python imports are added
# explicitly, always next to the torch pin. The last line fails the target if torch changed, if
# torchvision slipped in, or if curvlinops' HessianLinearOperator cannot be imported.
BENCH_PEERS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
BENCH_LIGHT := einops==0.8.2 einconv==0.1.0 linear_operator==0.6.1 opt-einsum==3.4.0
$(STAMP_BENCH): $(STAMP_CORE)
	$(PIP) install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps $(BENCH_PEERS)
	$(PIP) install -q $(BENCH_LIGHT) "$(TORCH_SPEC)"
	$(PY) -c "import importlib.util as u, importlib.metadata as m; spec = '$(TORCH_SPEC)'.split('=='); \
	assert len(spec) < 2 or m.version('torch').split('+')[0] == spec[1], 'torch changed: ' + m.version('torch'); \
	assert u.find_spec('torchvision') is None, 'torchvision was installed'; \
	from curvlinops import HessianLinearOperator; import pyhessian, hessian_eigenthings; \
	print('bench peers ok: torch', m.version('torch'), '| curvlinops', m.version('curvlinops-for-pytorch'), \
	'| pyhessian', m.version('pyhessian'), '| hessian-eigenthings', m.version('hessian-eigenthings'))"
	touch $@

venv: $(STAMP_TEST)

demo: $(STAMP_CORE)
	$(VENV)/bin/hessian-tools demo --out reports/demo

# Lint and format are checked first: a failing check stops the run before the tests.
test: $(STAMP_TEST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# The full comparison (~50 min on 2 cores; `make bench BENCH_ARGS=--quick` for a 30-second smoke run).
BENCH_ARGS ?=
bench: $(STAMP_BENCH)
	$(PY) analysis/bench_peers.py --out figures $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info reports
