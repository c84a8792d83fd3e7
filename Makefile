# largebatch: `make demo` trains and evaluates a detector on the embedded dataset; `make test` runs the tests.
# Everything is installed into a project-local .venv on first use. To use your own environment (for example
# one with an official detectron2 build), pass it: make demo PYTHON=/path/to/python
VENV := .venv
PYTHON ?= $(VENV)/bin/python
NUM_WORKERS ?= 2
DEMO_CONFIG ?= configs/shapes/demo.yaml
DEMO_DIR ?= output/demo
GPU_CHECK_DIR ?= output/gpu_check
STAMP := $(VENV)/.setup-done
# detectron2 main (Python sources of a pinned commit, ../shared/detectron2-main/) in a second environment: CI runs
# the suite on v0.6 (`make test`) and on main (`make test-d2main`)
D2MAIN_VENV := .venv-d2main
D2MAIN_SRC ?= ../shared/detectron2-main
D2MAIN_STAMP := $(D2MAIN_VENV)/.setup-done

.PHONY: setup demo test test-fast test-d2main lint bench study study-sweep scaling pipelines clean gpu-check
setup: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(STAMP),setup-external)

$(STAMP): tools/setup_env.sh setup.py
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	bash tools/setup_env.sh $(VENV)/bin/python
	touch $@

.PHONY: setup-external
setup-external:
	bash tools/setup_env.sh $(PYTHON)

demo: setup
	$(PYTHON) train_net.py --num-gpus $(NUM_WORKERS) --dist-url auto --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_DIR)
	$(PYTHON) tools/plot_metrics.py $(DEMO_DIR)

test: setup
	$(PYTHON) -m pytest -q tests

$(D2MAIN_STAMP): tools/setup_env.sh setup.py
	@test -f $(D2MAIN_SRC)/install.sh || { echo "error: $(D2MAIN_SRC)/install.sh not found: set D2MAIN_SRC to the folder holding detectron2 main's tarball and install.sh"; exit 2; }
	test -x $(D2MAIN_VENV)/bin/python || python3 -m venv $(D2MAIN_VENV)
	bash $(D2MAIN_SRC)/install.sh $(D2MAIN_VENV)/bin/python
	bash tools/setup_env.sh $(D2MAIN_VENV)/bin/python
	touch $@

test-d2main: $(D2MAIN_STAMP)
	$(D2MAIN_VENV)/bin/python -m pytest -q tests

# for iteration: everything but the end-to-end runs in subprocesses / worker processes (marked slow)
test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow" tests

# ruff (pycodestyle, pyflakes, import order; line length 120): configured in pyproject.toml
lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) bench/optim_step.py
	$(PYTHON) bench/agvm_overhead.py
	$(PYTHON) bench/monitor_overhead.py
	$(PYTHON) bench/noise_scale_overhead.py

study: setup
	$(PYTHON) bench/large_batch_study.py
	$(PYTHON) bench/syncbn_phi.py

# every recipe at batch 16 (the study detector's online B_noise), 48 (the measured B_crit) and 192 (4x above), each
# at LR x0.5 / x1 / x2 of its rule, against the batch-4 baseline at the same multipliers (~75 min); then SyncBN's
# bias of the noise scale at the sweep's weights (bench/syncbn_phi.py)
SWEEP_DIR ?= output/study_sweep
study-sweep: setup
	$(PYTHON) bench/study_sweep.py --output $(SWEEP_DIR)
	$(PYTHON) bench/syncbn_phi.py --study $(SWEEP_DIR) --trained $(SWEEP_DIR)/sgd_linear_b48_x1/model_final.pth

gpu-check: setup
	bash tools/gpu_check.sh $(GPU_CHECK_DIR)

clean:
	rm -rf output

# the critical batch measured (steps to a target loss at batch 4..128, McCandlish's fit) beside the online noise scale
scaling: setup
	$(PYTHON) bench/critical_batch.py

# AGVM's Fig. 1 for RetinaNet, Semantic FPN and Panoptic FPN: each part's gradient variance at batch 8 and 64 (~20 min)
pipelines: setup
	$(PYTHON) bench/pipeline_variance.py
