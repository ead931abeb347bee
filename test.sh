#!/bin/sh
# The whole suite: lint, format, types, layers, then the unit tests (tests/) and the tests that
# boot real VMs and run real daemons (integration/), in one pytest session.
#   ./test.sh                    all of it (.ci/run); a skipped test fails the run: after
#                                install.sh every component a test needs is there
#   ./test.sh PYTEST-ARGS...     the checks, then only those tests (tests/test_cli.py -k list)
#   ./test.sh --regen-golden     rewrites tests/golden/ from the code (and nothing else)
set -eu
cd "$(dirname "$0")"
VENV=${BONNEVILLE_VENV:-/opt/bonneville/venv}
if [ "${1-}" = --regen-golden ]; then
    exec "$VENV/bin/python" -m tests.golden_files
fi
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# The package bonneville/ (links to the top-level folders) from pyproject's [tool.mypy] files.
"$VENV/bin/mypy"
# The layers of pyproject's [tool.importlinter] contracts.
"$VENV/bin/lint-imports"
[ $# -gt 0 ] || set -- tests integration
# -rfEs: failures, errors and every skip's reason in the summary.
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -rfEs --fail-on-skip "$@"
