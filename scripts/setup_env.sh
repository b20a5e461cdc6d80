#!/usr/bin/env bash
# Create .venv (Python 3.11+), install the given pinned requirements file into it, then mansu itself (editable, so
# the `mansu` command and `import mansu` work from anywhere). Used by app.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(basename "$requirements")-$(cat requirements*.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$requirements"
  if [ "$(basename "$requirements")" = requirements-dev.txt ]; then  # the tests' corpus: without its stale deps
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-corpus.txt
  fi
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
