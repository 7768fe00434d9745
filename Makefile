# `make demo` and `make test` create the environment first if it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test env clean-env

env: $(VENV)/.installed

# One progress line; pip's own output goes to $(VENV)/install.log, shown only if the install fails.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "emfm: installing into $(VENV) (torch, lightning, timm, ...; about 2 min, log in $(VENV)/install.log)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip > $(VENV)/install.log 2>&1 \
		&& $(BIN)/python -m pip install -c constraints.txt -e '.[dev]' >> $(VENV)/install.log 2>&1 \
		|| { tail -n 30 $(VENV)/install.log; echo "emfm: install failed; full log in $(VENV)/install.log"; exit 1; }
	@touch $@
	@echo "emfm: environment ready ($(VENV))"

demo: env
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

test: env
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n 2

clean-env:
	rm -rf $(VENV)
