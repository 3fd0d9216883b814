"""Where the kdgraph binary under test is; torch-free, so that both Python suites (tests/python, tests/python_ort) use it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]


def find_kdgraph_bin(environ=os.environ, root: Path = ROOT) -> Tuple[Path | None, str]:
    """(the kdgraph binary under test, why none was found): $KDGRAPH_BIN when it is set (and then
    only it: a wrong path is an error, not a reason to test another build), else target/debug/kdgraph,
    the build `cargo build` and scripts/test.sh make. Never target/release: it may be older than the
    code under test."""
    given = environ.get("KDGRAPH_BIN")
    if given:
        path = Path(given)
        if path.is_file():
            return path, ""
        return None, f"KDGRAPH_BIN={given} is not a file; point it at the kdgraph binary to test"
    path = root / "target" / "debug" / "kdgraph"
    if path.is_file():
        return path, ""
    return None, f"kdgraph binary not found: set KDGRAPH_BIN, or run `cargo build` (for {path})"


@pytest.fixture(scope="session")
def kdgraph_bin() -> Path:
    """The binary under test; every test that needs it fails (never skips) without it."""
    path, why = find_kdgraph_bin()
    if path is None:
        pytest.fail(why, pytrace=False)
    return path
