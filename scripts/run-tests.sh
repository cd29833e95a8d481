#!/usr/bin/env bash
# Set up (first time) and run the whole test suite, headless. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ntkviz tests scripts
.venv/bin/ruff format --check ntkviz tests scripts
.venv/bin/lint-imports --no-cache
QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen} .venv/bin/python -m pytest -q "$@"
