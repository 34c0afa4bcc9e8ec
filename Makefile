# The two set-up commands of the README. Each creates .venv when missing and installs what it needs:
# torch first, pinned (an open range would pull a multi-GB CUDA build on a CPU machine), then the
# project with the right extra. Stamp files make a second run skip the installs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean

demo: $(VENV)/.demo-installed
	$(VENV)/bin/fastrft demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

bench: $(VENV)/.test-installed
	$(PY) bench/bench_cpu.py
	$(PY) bench/bench_logprob.py

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.demo-installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) install -q -e '.[demo]'
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
