#!/usr/bin/env bash
# Creates (or refreshes) .venv from tests/python/requirements.txt; a no-op when it is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
req=tests/python/requirements.txt
stamp=.venv/.requirements
if [ -x .venv/bin/python ] && cmp -s "$req" "$stamp"; then exit 0; fi
echo "creating the Python environment in .venv from $req (about two minutes)" >&2
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
