# Set-up lives here: `make demo` and `make test` each create .venv on first use.
# torch is installed only when the interpreter cannot import it, so a user's own CUDA build stays
# (the venv sees system site-packages). On a CPU-only machine torch==2.13.0 is the CPU wheel.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/worldstream demo

info: $(VENV)/.installed
	$(BIN)/worldstream info

test: $(VENV)/.installed
	$(BIN)/python -m pytest

.PHONY: setup demo info test
