#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#
#   bash tests/run.sh [pytest arguments]
#
# Creates .venv with Python 3.11 (or python3) if missing, installs the package
# with its test extra, installs PostgreSQL and Chromium from Debian's packages
# when running as root with apt-get, and runs pytest. Tests that need
# PostgreSQL or Chromium start them themselves on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
venv=${MLFLOW_CKPT_VENV:-.venv}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} from Debian's packages" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "tests/run.sh: creating $venv with $python_bin" >&2
  "$python_bin" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test]'

# `mlflow models serve --env-manager local` starts uvicorn from PATH.
export PATH="$PWD/$venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$venv/bin/python" -m pytest -ra "$@"
