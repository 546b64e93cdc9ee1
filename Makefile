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

run: install
	dvc repro
	barkgpt generate --prompt "User: speak Assistant:" --seed 0

test: install-dev
	python -m pytest

bench: install
	python benchmarks/bark_train.py

clean:
	rm -rf data/bark models reports/bark
