#!/usr/bin/env bash
# Runs every test of kdgraph: the Rust suite, the Python suite (PyTorch references, ORT Training), then
# the stock-onnxruntime suite, which judges the gradient graphs against the references the Python suite
# wrote. Creates the pinned Python environments (.venv, .venv-ort) when missing or out of date.
# Arguments go to the main Python suite; KDGRAPH_HEAVY=1 adds the heavy set to both (tests/python/heavy.py).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/python-env.sh
# tests/hostile.rs kills kdgraph between two renames with strace.
if ! command -v strace >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
fi
cargo build --locked --features fuzz-harness
cargo test --locked --features fuzz-harness
export KDGRAPH_BIN="$PWD/target/debug/kdgraph"
# Both Python suites run even when the first fails; the exit status is the first failure's.
status=0
.venv/bin/python -m pytest -q tests/python "$@" || status=$?
.venv-ort/bin/python -m pytest -q tests/python_ort || { s=$?; [ "$status" != 0 ] || status=$s; }
exit "$status"
