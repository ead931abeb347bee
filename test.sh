#!/bin/sh
# The whole test suite: lint, format, types (library code), unit tests, then real-VM tests.
set -eu
cd "$(dirname "$0")"
VENV=${BONNEVILLE_VENV:-/opt/bonneville/venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# mypy cannot see the folder → bonneville.* mapping of pyproject.toml: give it a tree of links.
typeroot=$(mktemp -d)
trap 'rm -rf "$typeroot"' EXIT
mkdir "$typeroot/bonneville"
for d in shim spec backends guest; do ln -s "$PWD/$d" "$typeroot/bonneville/$d"; done
(cd "$typeroot" && "$VENV/bin/mypy" --strict --namespace-packages --explicit-package-bases \
    --cache-dir /tmp/bonneville-mypy-cache bonneville/shim bonneville/spec bonneville/backends \
    bonneville/guest)
# Not exec: the EXIT trap above must still remove the type tree.
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
