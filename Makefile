# The README's two commands: `make demo` and `make test`. Both install first (into .venv).
# `make test-fast` is the quick subset (not the slow multi-process runs).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LAUNCH := $(VENV)/bin/accelerate launch --config_file ds_configs/zero2.yaml

.PHONY: install demo data lint test test-fast test-matrix clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision first, from the registry (CUDA builds; they run on CPU-only machines too)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[test,peer]"
	# without a GPU, DeepSpeed runs on its CPU accelerator and compiles two ops on first use (its shared-memory
	# all-reduce for every run, CPU Adam for the optimizer offload): about 90 s, paid here once, not in the first run
	$(PY) -c "from deepspeed.accelerator import get_accelerator as acc; \
	  [acc().create_op_builder(op).load() for op in ('ShareMemCommBuilder', 'CPUAdamBuilder') if acc()._name == 'cpu']"
	touch $(STAMP)

data: install
	test -d data/digits/train || $(VENV)/bin/harness data digits --out data/digits

# The main job: 2 processes, DeepSpeed ZeRO-2 (gloo on a CPU-only machine), digits demo, zero-shot eval.
demo: data
	$(LAUNCH) train.py --config digits --run-name digits-demo-$$(date +%Y%m%d-%H%M%S)

# ruff (config in ruff.toml); part of `make test`
lint: install
	$(VENV)/bin/ruff check .

# the full suite (real multi-process runs on gloo included), the 25 slowest tests listed at the end
test: lint
	$(PY) -m pytest -q --durations=25 -m "not matrix" tests

# the cases of the multi-process matrices that `make test` leaves out (marker `matrix`), about 11 minutes; CI runs it after `make test`
test-matrix: lint
	$(PY) -m pytest -q -m matrix tests

# the quick subset: everything not marked slow (single-process units), a few minutes on two cores
test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs data
