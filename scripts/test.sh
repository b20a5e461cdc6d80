#!/usr/bin/env bash
# Install the test dependencies (Python packages and Debian's chromium for the browser tests), run ruff, build the demo
# model into the test home (with its own progress lines, never under a test's timeout), and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-dev.txt
if [ ! -x /usr/bin/chromium ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .   # the house rules (pyproject.toml [tool.ruff]); zero findings
# The same test home as tests/conftest.py: MANSU_TEST_HOME, else .pytest_cache/mansu-home in the repository.
test_home="${MANSU_TEST_HOME:-$PWD/.pytest_cache/mansu-home}"
echo "demo model for the tests: $test_home/demo (built now if missing or of an older recipe)" >&2
MANSU_HOME="$test_home" .venv/bin/python -m mansu demo --no-eval
exec .venv/bin/python -m pytest "$@"
