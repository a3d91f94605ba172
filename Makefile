# Two set-up commands, each creating/reusing .venv with pinned dependencies:
#   make demo   runs the main job on embedded defaults (tiny models, CPU, 2 processes)
#   make test   runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU comm op once (~45 s); keep the build between runs
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export HF_HUB_OFFLINE ?= 1

.PHONY: venv demo test clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# make demo OUT=<dir>: where the demo writes (a new or empty folder)
OUT ?= demo_out
demo: venv
	$(PY) launch/demo.py --out $(OUT)

test: venv
	$(PY) -m pytest -ra --durations=15 tests

clean-venv:
	rm -rf $(VENV)
