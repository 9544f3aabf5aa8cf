#!/usr/bin/env bash
# Sets everything up and runs the main job (`asymlora demo`) on its built-in default.
# Extra arguments go to `asymlora demo` (see `asymlora demo --help`).
source "$(dirname "$0")/_venv.sh"
install_asymlora demo
install_demo_data
echo "==> asymlora demo $*"
"$VENV/bin/asymlora" demo "$@"
