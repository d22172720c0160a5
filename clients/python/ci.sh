#!/usr/bin/env bash
# The Python follower's checks: a fresh venv, the package and its test extra
# installed from PyPI by name (msgpack, pytest), then pytest. The tests build
# the Rust binaries they use with cargo (the conformance harness, the
# registry, the standalone example); with TANDEM_SKIP_BUILD=1 they expect
# them in target/debug already.
#
#   clients/python/ci.sh            # from anywhere in the repository
#   PYTHON=python3.11 clients/python/ci.sh -k leader
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV="${TANDEM_PY_VENV:-.venv}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
exec "$VENV/bin/python" -m pytest -q "$@"
