# The README's two commands live here: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-py312 lint clean bench bench-full

$(BIN)/unipt: pyproject.toml requirements-lock.txt requirements-assets.txt setup.sh
	UNIPT_VENV=$(VENV) ./setup.sh
	@touch $@

setup: $(BIN)/unipt

demo: setup
	$(BIN)/unipt run configs/rt_minilm.yaml

test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) test-py312

# The quick tier while working: no end-to-end runs, fault injection, install or slow tests (pyproject's markers).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not faults and not install and not slow"

# Python 3.12: the index serves torch for 3.12 only as its CUDA build (with about 3 GB of nvidia-* packages),
# so 3.12 runs the part of the suite that needs no torch: configs, datasets (files, images, Hugging Face),
# the cache format and the lock (less one test that hashes a real backbone through torch).
# CI sets UNIPT_REQUIRE_PY312=1, so a missing 3.12 fails there.
# The first candidate that really is 3.12 (a pyenv shim named python3.12 may not run).
PY312 ?= $(shell for p in $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) $$(command -v python3.12); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo "$$p" && break; done)
PY312_TESTS := tests/test_config.py tests/test_datasets.py tests/test_datasets_images.py \
	tests/test_hf_datasets.py tests/test_cache.py tests/test_versioning.py tests/test_packaging.py
# The tests in those files that need torch or Ray (they run with the whole suite on 3.11).
PY312_DESELECT := tests/test_versioning.py::test_real_backbone_files_drive_the_identity \
	tests/test_cache.py::test_a_real_segment_and_view_parse_to_typed_attributes_and_keep_every_one \
	tests/test_config.py::test_a_checkpoint_must_agree_on_the_training_settings_and_only_those \
	tests/test_config.py::test_a_checkpoint_from_before_a_setting_existed_resumes_only_with_what_it_computed

test-py312: requirements-lock.txt requirements-assets.txt
	@if [ -z "$(PY312)" ]; then \
	  echo "test-py312: no Python 3.12 found (set PY312=/path/to/python3.12)"; [ -z "$$UNIPT_REQUIRE_PY312" ]; \
	else \
	  set -e; $(PY312) -m venv .venv312; \
	  .venv312/bin/python -m pip install -q --no-compile -c requirements-lock.txt zarr numcodecs fsspec \
	    pyarrow numpy pydantic PyYAML tqdm safetensors pillow datasets pytest packaging; \
	  .venv312/bin/python -m pip install -q --no-compile --no-deps -r requirements-assets.txt; \
	  .venv312/bin/python -m pip install -q --no-compile --no-deps -e .; \
	  .venv312/bin/python -m pytest -q -p no:cacheprovider $(PY312_TESTS) $(addprefix --deselect ,$(PY312_DESELECT)); \
	fi

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
	$(BIN)/python benchmarks/incremental.py --epochs 3
	$(BIN)/python benchmarks/incremental.py --loader
	$(BIN)/python benchmarks/length_grouping.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/scaling.py --backbones minilm --sizes 12808 --resume
	$(BIN)/python benchmarks/methods.py
	$(BIN)/python benchmarks/augmented_views.py
	$(BIN)/python benchmarks/text_pairs.py --seeds 0 1 2

clean:
	rm -rf .unipt
