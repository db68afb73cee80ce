# The README's two commands live here: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/unipt: pyproject.toml requirements-assets.txt setup.sh
	UNIPT_VENV=$(VENV) ./setup.sh
	@touch $@

setup: $(BIN)/unipt

demo: setup
	$(BIN)/unipt run configs/rt_minilm.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .unipt
