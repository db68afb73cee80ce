# The README's two commands live here: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean bench bench-full

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

# Issue 7's benchmarks, each printing its table and writing JSON/CSV under benchmarks/results/, then the
# accuracy/memory plot. `bench` uses the quick settings behind the README's tables (about 1 hour on 2 CPU
# cores); `bench-full` every example and the config's epochs (many hours on a CPU).
bench: setup
	$(BIN)/python benchmarks/cache_size.py --limit 2000
	$(BIN)/python benchmarks/loader_throughput.py --limit 3000 --repeats 3
	$(BIN)/python benchmarks/accuracy.py --datasets rotten_tomatoes --limit 1000 --epochs 3 \
		--methods linear-probe unipt-fp16 unipt-int8
	$(BIN)/python benchmarks/accuracy.py --datasets bbc_news --limit 500 --epochs 2 \
		--methods linear-probe unipt-fp16 unipt-int8 --append
	$(BIN)/python benchmarks/accuracy.py --datasets rotten_tomatoes --limit 1000 --epochs 3 --finetune-epochs 10 \
		--methods full-finetune --append
	$(BIN)/python benchmarks/accuracy.py --datasets bbc_news --limit 500 --epochs 2 --finetune-epochs 10 \
		--methods full-finetune --append
	$(BIN)/python benchmarks/baselines.py --limit 2000 --epochs 3
	$(BIN)/python benchmarks/extract_overhead.py --limit 2000 --repeats 3
	$(BIN)/python benchmarks/plot_tradeoff.py

bench-full: setup
	$(BIN)/python benchmarks/cache_size.py --limit 0
	$(BIN)/python benchmarks/loader_throughput.py --limit 0 --repeats 5
	$(BIN)/python benchmarks/accuracy.py
	$(BIN)/python benchmarks/baselines.py
	$(BIN)/python benchmarks/extract_overhead.py --limit 0 --repeats 3
	$(BIN)/python benchmarks/plot_tradeoff.py

clean:
	rm -rf .unipt
