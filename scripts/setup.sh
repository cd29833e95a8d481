#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install ntkviz with its test tools, once; re-run when
# pyproject.toml changes. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.ntkviz-installed
want=$(sha256sum pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$candidate
    break
  fi
done
[ -n "$python" ] || { echo "ntkviz needs Python >= 3.11" >&2; exit 1; }
echo "setting up .venv with $($python --version) (first run: a few minutes)..." >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[test]"
echo "$want" >"$stamp"
