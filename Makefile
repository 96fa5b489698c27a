# tier3 — the two commands of the README, and what they need.
#   make demo   the main job on embedded defaults (local Kafka, worker, trainer, SmolLM2-135M student on CPU)
#   make test   lint, type check and the whole test suite against a real local Kafka broker
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m trainer.close_loop.gguf_converter fetch  # llama.cpp's GGUF converter, so exports run offline
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	bash .ci/install_system_deps.sh --no-browser
	$(BIN)/tier3 demo

lint: setup
	$(BIN)/ruff check schemas streams trainer tier3 tests bench examples docs

typecheck: setup
	$(BIN)/mypy

pytest: setup
	bash .ci/install_system_deps.sh
	$(BIN)/pytest tests

test: lint typecheck pytest

bench: setup
	$(BIN)/python bench/producer.py

clean:
	-$(BIN)/tier3 broker down
	rm -rf .tier3
