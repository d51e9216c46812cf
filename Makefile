# The two README commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first and pinned, from the CPU wheel set, so nothing drags in a CUDA build.
# Off this machine, add PyTorch's CPU index: make TORCH_PIP_ARGS="--index-url <cpu index>"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
REHEARSE_FLAGS ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run rehearse test test-slow lint bench install clean lock deploy-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The image lock is CI's constraint file too: what CI tests is what Modal's images run.
$(VENV)/.installed: pyproject.toml requirements/image-gpu.txt | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -c requirements/image-gpu.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# A local dev server: loopback image URLs are allowed so the bundled sample image works
# offline (`magicmix serve` on its own keeps the SSRF guard fully on).
run: install
	MAGICMIX_ALLOW_PRIVATE_URLS=$${MAGICMIX_ALLOW_PRIVATE_URLS:-true} \
	MAGICMIX_PUBLIC_URL=$${MAGICMIX_PUBLIC_URL:-http://$(HOST):$(PORT)} \
	$(BIN)/magicmix serve --host $(HOST) --port $(PORT) --print-curl

# The Modal app rehearsed locally (docs/rehearsal.md): modal_app.py under an emulation of
# Modal's runtime, on a throwaway PostgreSQL and S3 store on loopback, the toy model
# (MAGICMIX_MODEL=tiny or a folder for another). Flags for scripts/modal-rehearsal:
# make rehearse REHEARSE_FLAGS="--gpus 2 --crash-gpu-every 5". Ctrl-C stops it all.
rehearse: install
	$(BIN)/python -m rehearsal.local --port $(PORT) $(REHEARSE_FLAGS)

lint: install
	$(BIN)/ruff check magicmix rehearsal tests benchmarks infra scripts/lock.py scripts/sabotage.py scripts/deploy-check scripts/modal-rehearsal modal_app.py
	$(BIN)/mypy
	$(BIN)/bandit -q -c pyproject.toml -r magicmix
	$(BIN)/lint-imports
	$(BIN)/python scripts/lock.py --check

# The suite starts a real PostgreSQL of its own (never skipped): say how to install one first.
test: install lint
	$(BIN)/python -m magicmix.store.testing
	scripts/install-browser.sh
	$(BIN)/python -m pytest -n 2

test-slow: install
	$(BIN)/python -m magicmix.store.testing
	$(BIN)/python -m pytest -n 2 -m slow

# After changing dependencies: pin the Modal images to what is installed (and tested).
lock: install
	$(BIN)/python scripts/lock.py

# Everything about a deployment that can be checked before `modal deploy`.
deploy-check: install
	$(BIN)/python scripts/deploy-check

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .magicmix .pytest_cache .mypy_cache .ruff_cache
