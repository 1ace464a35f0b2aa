# Set-up and entry points. Every target creates .venv/ itself on a fresh machine.
#
# Versions: requirements.lock holds the exact versions the test suite passed with (runtime and
# dev, plus pip and setuptools); every install below uses it as a pip constraints file, so a fresh
# machine gets those versions. pyproject.toml keeps the ranges a library user installs against.
# The torch stack (torch, triton, nvidia-*) is not in that lock: requirements-torch.lock pins it
# for CPU machines and is installed FIRST, only when .venv has no torch yet, so that no later
# requirement makes pip resolve a several-GB CUDA build. GPU users: install your CUDA torch into
# .venv before `make`; it is kept (torch's pin in pyproject.toml is a range, and the lock does
# not name it).
#
# `make lock` refreshes both lock files against the newest versions pyproject.toml allows: it
# builds a temporary venv, runs the whole test suite there, and writes the locks only if it passes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
TORCH_LOCK := requirements-torch.lock
# The CPU torch wheel that `make lock` installs (this machine's local wheel).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) $(TORCH_LOCK) | md5sum | cut -c1-8)
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/dsa-rag-lock-venv

.PHONY: venv test run demo lock clean

$(STAMP): pyproject.toml $(LOCK) $(TORCH_LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip setuptools
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q -r $(TORCH_LOCK)
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e ".[dev]"
	rm -f $(VENV)/.installed-*
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

# Refresh the locks: a fresh venv with the newest allowed versions (the CPU torch wheel first),
# the whole test suite there, and only if it passes, new requirements.lock / requirements-torch.lock.
# Takes as long as `make test` plus the downloads. .venv is not touched: run `make venv` after.
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(LOCK_VENV)/torch-constraint.txt   # else the eager upgrade pulls a CUDA torch
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation \
	    -c $(LOCK_VENV)/torch-constraint.txt -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pip check
	TRITON_INTERPRET=1 $(LOCK_VENV)/bin/python -m pytest -q tests
	{ echo "# Exact versions the test suite passed with (runtime + dev, and pip/setuptools). Written by"; \
	  echo "# \`make lock\` from pyproject.toml's ranges; installed as constraints by \`make venv\`."; \
	  echo "# The torch stack (torch, triton, nvidia-*) is in requirements-torch.lock instead."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-)'; \
	} > $(LOCK).new
	{ echo "# The CPU torch stack the test suite passed with. \`make venv\` installs it only when .venv has"; \
	  echo "# no torch yet (a GPU user's own CUDA torch is kept). Written by \`make lock\`."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -iE '^(torch|triton)==' | sed 's/+cpu$$//'; \
	} > $(TORCH_LOCK).new
	mv $(LOCK).new $(LOCK)
	mv $(TORCH_LOCK).new $(TORCH_LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV)
