#!/usr/bin/env bash
# Install mansu, build the embedded demo (world + model, about a minute on 2 CPU cores) and open the app.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
.venv/bin/python -m mansu demo
exec .venv/bin/python -m streamlit run app.py "$@"
