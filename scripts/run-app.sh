#!/usr/bin/env bash
# Set up (first time) and launch the ntkviz desktop app. Extra arguments go to `ntkviz`
# (e.g. `bash scripts/run-app.sh demo` for the headless demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ntkviz "$@"
