#!/usr/bin/env bash
# Creates (or refreshes) the two pinned Python environments of the tests, each a no-op when it is up
# to date: .venv from tests/python/requirements.txt (ORT Training, torch: the main suite) and
# .venv-ort from tests/python/requirements-ort.txt (stock onnxruntime: tests/python_ort). Stock
# onnxruntime and onnxruntime-training both install the `onnxruntime` module, so they cannot share one.
set -euo pipefail
cd "$(dirname "$0")/.."

make_env() {
    local venv=$1 req=$2 minutes=$3
    local stamp=$venv/.requirements
    if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then return 0; fi
    echo "setting up the Python environment in $venv from $req (about $minutes)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
}

make_env .venv tests/python/requirements.txt "two minutes"
make_env .venv-ort tests/python/requirements-ort.txt "half a minute"
