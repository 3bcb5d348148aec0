#!/usr/bin/env bash
# Creates ./.venv and installs nnlandmark_h3de (+ nnunetv2 2.8.1, torch) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "installed: $(.venv/bin/python -c 'import nnlandmark_h3de, nnunetv2, torch; print("nnlandmark_h3de", nnlandmark_h3de.__version__, "torch", torch.__version__)')"
