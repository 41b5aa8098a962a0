# Every target bootstraps .venv itself, so `make pretrain` / `make test` work on a fresh machine.
# GPU clusters: override TORCH_SPEC with their own build, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXPERIMENT ?= tiny_cpu
LAUNCHER   ?=
ARGS       ?=
IMAGE      ?= pretrain-pipeline

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup pretrain lint test test-fast test-faults golden bench docker clean

setup: $(STAMP)

# torch goes in first and alone: a later range that torch already satisfies then installs nothing,
# instead of pulling a newer build with gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[fast,test,ray]"
	touch $(STAMP)

# make pretrain EXPERIMENT=llama2_7b_continue LAUNCHER=slurm ARGS="train.init=/models/Llama-2-7b-hf"
pretrain: $(STAMP)
	$(BIN)/pipeline run experiment=$(EXPERIMENT) $(if $(LAUNCHER),launcher=$(LAUNCHER)) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench

# everything, as CI runs it (~27 min on 2 cores)
test: lint
	$(BIN)/python -m pytest -q tests $(ARGS)

# the fast tier, for a developer's loop (tests/unit, ~2.5 min on 2 cores)
test-fast: lint
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

# kill -9 every stage at 20 seeded points, rerun, compare with an uninterrupted run; prints a table (~1 h)
test-faults: $(STAMP)
	$(BIN)/python tests/faults/kill_points.py --points 20 $(ARGS)

# rewrite tests/golden/losses.json after a change meant to move the default experiment's losses
golden: $(STAMP)
	GOLDEN_UPDATE=1 $(BIN)/python -m pytest -q tests/golden

bench: $(STAMP)
	$(BIN)/python bench/tokenize.py
	$(BIN)/python bench/tokenize.py --executor ray
	$(BIN)/python bench/train_hf.py
	$(BIN)/python bench/train_hf.py model.hidden_size=512 model.num_layers=4 model.ffn_hidden_size=1408 \
	    model.num_attention_heads=8 model.num_key_value_heads=4
	$(BIN)/python bench/train_megatron.py
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/tokenizer_sample.py

docker:
	docker build -f docker/Dockerfile -t $(IMAGE) .

clean:
	rm -rf runs outputs .pytest_cache
