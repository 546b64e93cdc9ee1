# The two commands of the README: `make run` (the bark pipeline end to end) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test install install-dev bench clean

install:
	scripts/install.sh all

install-dev:
	scripts/install.sh all,dev
	scripts/install-test-tools.sh

# The main job: the bark-pipeline Prefect flow in-process, on embedded defaults (local Prefect API,
# MLflow on SQLite, local AWS API), from data to deployment; then one completion from the model.
run: install
	python -m flows.pipeline bark
	barkgpt generate --prompt "User: speak Assistant:" --seed 0

test: install-dev
	python -m pytest

bench: install
	python benchmarks/bark_train.py

clean:
	rm -rf data/bark data/webtext models exports reports/bark reports/webtext
