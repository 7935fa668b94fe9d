#!/usr/bin/env bash
# One-shot set-up on a fresh Debian 12 machine: system packages, a venv in .venv, the
# project in editable mode with its dev extras. Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install-system-deps.sh"
py=${PYTHON:-python3}
if [ ! -x "$here/.venv/bin/python" ]; then
  "$py" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install -q --upgrade pip
"$here/.venv/bin/python" -m pip install -q -e "$here[dev]"
echo "setup: done; tools are in $here/.venv/bin"
