# Set-up and entry points. Every target creates .venv/ itself on a fresh machine.
# CPU machines: the local CPU wheel torch==2.13.0 is installed FIRST, so that no later
# requirement makes pip resolve a several-GB CUDA build. GPU users: install your CUDA torch
# into .venv before `make`, it is kept (the pin below is skipped when torch already imports).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: venv test run demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

# The main job: the service (local Ray Serve + embedded Redis + the default model dsa-tiny).
run: $(STAMP)
	$(BIN)/dsa-rag serve $(ARGS)

# Model-only demo: prefill a long context and generate through the caches.
demo: $(STAMP)
	$(BIN)/python examples/model_demo.py $(ARGS)

clean:
	rm -rf $(VENV)
