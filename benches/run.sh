#!/usr/bin/env bash
# Sets everything up (virtualenv, asymlora with torch) and runs one benchmark.
#   bash benches/run.sh regenerate [--threads N] [--repeats 7]
source "$(dirname "$0")/../scripts/_venv.sh"
name="${1:-regenerate}"
shift || true
install_asymlora test
"$PY" "$ROOT/benches/bench_${name}.py" "$@"
