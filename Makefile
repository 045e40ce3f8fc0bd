# Quick start: `make demo` (set up, pull the default zoo model, quantize, evaluate) and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
MODEL ?= smollm2-135m
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-fast clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk, so pip never pulls a CUDA build
setup: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q -e ".[test,plot,lmeval,export]"

demo: setup
	$(VPY) -m lowbit pull $(MODEL) wiki
	$(VPY) -m lowbit run $(MODEL) --method fp32 --ppl wiki --results-dir out/demo
	for b in 4 3 2; do $(VPY) -m lowbit run $(MODEL) --method rtn --bits $$b --group-size 128 --ppl wiki --results-dir out/demo || exit 1; done
	@cat out/results.md

test: setup
	$(VPY) -m pytest -q -m "not slow" tests
	$(VPY) -m pytest -q -m slow tests

test-fast: setup
	$(VPY) -m pytest -q -m "not slow" tests

clean:
	rm -rf out build dist src/*.egg-info
