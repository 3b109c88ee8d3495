# The README's two commands: `make demo` and `make test`. Both install first (into .venv).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LAUNCH := $(VENV)/bin/accelerate launch --config_file ds_configs/zero2.yaml

.PHONY: install demo data test clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision first, from the registry (CUDA builds; they run on CPU-only machines too)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[test,peer]"
	touch $(STAMP)

data: install
	test -d data/digits/train || $(VENV)/bin/harness data digits --out data/digits

# The main job: 2 processes, DeepSpeed ZeRO-2 (gloo on a CPU-only machine), digits demo, zero-shot eval.
demo: data
	$(LAUNCH) train.py --config digits --run-name digits-demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data
