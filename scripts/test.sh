#!/usr/bin/env bash
# Runs every test of kdgraph: the Rust suite, then the Python suite (PyTorch references, ORT Training).
# Creates the pinned Python environment in .venv when it is missing or out of date.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/python-env.sh
# tests/hostile.rs kills kdgraph between two renames with strace.
if ! command -v strace >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
fi
cargo build --locked --features fuzz-harness
cargo test --locked --features fuzz-harness
KDGRAPH_BIN="$PWD/target/debug/kdgraph" .venv/bin/python -m pytest -q tests/python "$@"
