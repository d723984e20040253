#!/usr/bin/env bash
# Runs the whole test suite on CPU. First run installs everything (including Debian's chromium for
# the browser test) into .venv. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
bash scripts/setup_env.sh test
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "[test] chromium install failed"
  else
    echo "[test] not root: install chromium yourself (apt-get install chromium)"
  fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q "$@"
