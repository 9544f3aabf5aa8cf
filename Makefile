# The developer loop (see CONTRIBUTING.md). Everything runs in the project virtualenv.
#
#   make dev                 build the extension into .venv, editable (python/ stays live)
#   make test                test-rs and test-py
#   make test-rs             cargo fmt --check, clippy -D warnings, cargo test
#   make test-py ARGS=...    make dev, then pytest (ARGS go to pytest: ARGS="-k merge -x")
#   make lint                cargo fmt --check, clippy, ruff check, ruff format --check, stubtest
#   make bench NAME=... ARGS=...   benches/bench_$(NAME).py on a release build
#   make demo-data           the demo's model and data packages (for tests/test_demo.py)

VENV ?= .venv
PY := $(VENV)/bin/python
MATURIN := $(VENV)/bin/maturin
# The cargo profile `make dev` builds with: release-like, no LTO (see Cargo.toml).
PROFILE ?= dev-py
ARGS ?=
NAME ?= regenerate

.PHONY: dev test test-rs test-py lint lint-rs lint-py stubtest bench demo-data

# A missing virtualenv (or maturin) is made as scripts/_venv.sh makes it.
$(MATURIN):
	VENV="$(abspath $(VENV))" bash -c 'source scripts/_venv.sh'

dev: $(MATURIN)
	VIRTUAL_ENV="$(abspath $(VENV))" $(MATURIN) develop --profile $(PROFILE) -E test

test: test-rs test-py

test-rs: lint-rs
	cargo test --workspace --quiet

test-py: dev
	$(PY) -m pytest -q $(ARGS)

lint: lint-rs lint-py stubtest

lint-rs:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings

# ruff comes with the test extra, which `make dev` installs.
$(VENV)/bin/ruff:
	$(MAKE) dev

lint-py: $(VENV)/bin/ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The stubs (python/asymlora/_native.pyi) against the extension as built.
stubtest: dev
	$(PY) -m mypy.stubtest asymlora._native --allowlist stubtest-allowlist.txt

# Release build, as the runs recorded in benches/RESULTS.md; `make dev` goes back to dev-py.
bench:
	$(MAKE) dev PROFILE=release
	$(PY) benches/bench_$(NAME).py $(ARGS)

demo-data: $(MATURIN)
	VENV="$(abspath $(VENV))" bash -c 'source scripts/_venv.sh && install_demo_data'
