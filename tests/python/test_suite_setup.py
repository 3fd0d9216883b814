"""The suite's own setup: which kdgraph binary it tests, and that a missing one fails the run."""

import os
import subprocess
import sys

import pytest

from conftest import HERE, ROOT, find_kdgraph_bin


def make_binary(root, profile):
    path = root / "target" / profile / "kdgraph"
    path.parent.mkdir(parents=True)
    path.write_text("")
    return path


def test_lookup_prefers_kdgraph_bin(tmp_path):
    """$KDGRAPH_BIN wins over any build in target/."""
    given = tmp_path / "under-test" / "kdgraph"
    given.parent.mkdir()
    given.write_text("")
    make_binary(tmp_path, "debug")
    make_binary(tmp_path, "release")
    assert find_kdgraph_bin({"KDGRAPH_BIN": str(given)}, tmp_path) == (given, "")


def test_lookup_never_falls_back_from_a_wrong_kdgraph_bin(tmp_path):
    """A KDGRAPH_BIN that names no file is an error that names it, not a reason to test target/debug."""
    make_binary(tmp_path, "debug")
    missing = tmp_path / "missing" / "kdgraph"
    path, why = find_kdgraph_bin({"KDGRAPH_BIN": str(missing)}, tmp_path)
    assert path is None and str(missing) in why, why


def test_lookup_takes_the_debug_build_never_release(tmp_path):
    """Without KDGRAPH_BIN: target/debug (what `cargo build` and scripts/test.sh make); a target/release
    build alone, possibly older than the code under test, is not used."""
    make_binary(tmp_path, "release")
    path, why = find_kdgraph_bin({}, tmp_path)
    assert path is None and "KDGRAPH_BIN" in why and "cargo build" in why, (path, why)
    debug = make_binary(tmp_path, "debug")
    assert find_kdgraph_bin({}, tmp_path) == (debug, "")


def test_missing_binary_fails_the_run(tmp_path):
    """A pytest run without the binary fails (an error per test that needs it, with the reason); it does
    not skip to a green run. One test of each module that runs kdgraph by itself."""
    missing = tmp_path / "no-such-kdgraph"
    node_ids = [
        "test_fixture_taps.py::test_taps_match_torch_feats[resnet20-eval]",
        "test_torchvision_taps.py::test_torchvision_taps[resnet18-ts-eval]",
        "test_merge_stages.py::test_crd_needs_the_dataset_size",
    ]
    env = {**os.environ, "KDGRAPH_BIN": str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(HERE / n) for n in node_ids)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}:\n{out}"
    assert "3 errors" in out and "skipped" not in out and "passed" not in out, out
    assert out.count(f"KDGRAPH_BIN={missing} is not a file") >= 3, out
