#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: Rust format, lints and tests,
# then ruff, stubtest and pytest against the package built and installed from this checkout.
source "$(dirname "$0")/_venv.sh"
echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --workspace --quiet
install_asymlora test
install_demo_data
echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "==> stubtest (python/asymlora/_native.pyi against the built module)"
"$PY" -m mypy.stubtest asymlora._native --allowlist "$ROOT/stubtest-allowlist.txt"
echo "==> pytest"
# The sources live in python/, so `import asymlora` here is the installed wheel.
"$PY" -m pytest -q "$@"
