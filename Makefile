# Two set-up commands, each creating/reusing .venv with pinned dependencies:
#   make demo   runs the main job on embedded defaults (tiny models, CPU, 2 processes)
#   make test   runs the whole test suite
#   make test-fast  the in-process subset for the edit-test loop (< 5 minutes on 2 idle cores)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU comm op once (~3 minutes on 2 cores); keep the build between runs
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export HF_HUB_OFFLINE ?= 1

.PHONY: venv demo test test-fast gpu-check clean-venv

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

# 2 workers, a whole file each (tests/conftest.py says why); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -ra --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

# models, losses against their oracles, flash-attention on CPU, FLOP counts, configs, data
# decoding and streaming: no training runs (measured: 134 tests, 3m04s wall and 77 s of CPU on
# a 2-core machine shared with other jobs, load ~5)
FAST_TESTS := test_config test_models test_gen_model test_flash_standin test_gen_flops test_oracles \
	test_data_decode test_data_stream test_storage test_weights
test-fast: venv
	$(PY) -m pytest -ra --durations=10 $(addprefix tests/,$(addsuffix .py,$(FAST_TESTS)))

# every CUDA check in <= 8 minutes on one H100 / H200 (benchmarks/gpu_check.sh: installs flash-attn
# when it does not import, printing the command first, then runs benchmarks/gpu_check.py); the
# report: $(GPU_CHECK_OUT)/gpu_check.md and .json. GPU_CHECK_ARGS=--dry-run lists the plan (no GPU
# needed), GPU_CHECK_ARGS="--only gen_step_sdpa" reruns one step.
GPU_CHECK_OUT ?= gpu_check_out
gpu-check: venv
	bash benchmarks/gpu_check.sh --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
