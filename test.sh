#!/bin/sh
# The whole test suite: lint, format, types (library code), unit tests, then real-VM tests.
set -eu
cd "$(dirname "$0")"
VENV=${BONNEVILLE_VENV:-/opt/bonneville/venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# The package bonneville/ (links to the top-level folders) from pyproject's [tool.mypy] files.
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
