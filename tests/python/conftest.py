"""Shared pytest fixtures of the Python suite: the kdgraph binary, the cache, fixture models, merges."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "fixtures"
CACHE = HERE / ".cache"
# Fixture exports: FIXTURE_CACHE/<hash of make_fixtures.py>/<mode>/<name>.onnx (fixture_path).
FIXTURE_CACHE = CACHE / "fixtures"

# kd_reference and merge_checks from here; train_ort (the ORT Training helper that users run too)
# from examples/.
for _path in (HERE, ROOT / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from heavy import HEAVY  # noqa: E402
from kdgraph_binary import find_kdgraph_bin, kdgraph_bin  # noqa: E402,F401  (re-exported: test_suite_setup; the fixture)


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mf = _load_make_fixtures()


def pytest_collection_modifyitems(config, items):
    """Deselects the heavy cases unless KDGRAPH_HEAVY=1 (the summary counts them as deselected)."""
    if HEAVY:
        return
    dropped = [item for item in items if item.get_closest_marker("heavy")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("heavy")]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """tests/python/.cache (git-ignored), kept between runs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def fixture_path(name: str, mode: str) -> Path:
    """The committed file where there is one, else an export cached by make_fixtures' hash (the one
    copy: every test module imports it from here)."""
    for committed_name, committed_mode, file in mf.COMMITTED:
        if (committed_name, committed_mode) == (name, mode):
            return FIXTURES / file
    digest = hashlib.sha256((FIXTURES / "make_fixtures.py").read_bytes()).hexdigest()[:12]
    if not (FIXTURE_CACHE / digest).exists():
        shutil.rmtree(FIXTURE_CACHE, ignore_errors=True)  # exports of older versions of the script
    path = FIXTURE_CACHE / digest / mode / f"{name}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        mf.export(mf.build(name), partial, mode)
        partial.replace(path)
    return path


@pytest.fixture(scope="session")
def make_fixtures():
    """The fixtures/make_fixtures.py module (build, export, MODEL_NAMES, ...)."""
    return mf


@pytest.fixture(scope="session")
def model_path() -> Callable[[str, str], Path]:
    """model_path(name, mode) -> the ONNX export (committed or generated into the cache)."""
    return fixture_path


@pytest.fixture(scope="session")
def kdgraph_version(kdgraph_bin) -> str:
    """The version that `kdgraph --version` prints (graphs carry it in metadata_props)."""
    out = subprocess.run([str(kdgraph_bin), "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.split()[-1]


class MergeError(AssertionError):
    pass


@pytest.fixture(scope="session")
def merge(kdgraph_bin, tmp_path_factory) -> Callable[..., Path]:
    """merge(teacher, student, methods, *extra_args) -> joint.onnx (its joint.json beside it).

    teacher / student: paths, or (name, mode) tuples for fixture_path. Each distinct call runs
    `kdgraph merge` once per test session (results are memoised); a failing merge raises with
    kdgraph's output.
    """
    done: Dict[Tuple, Path] = {}
    root = tmp_path_factory.mktemp("merge")
    # Folder numbers count every attempt: a failed merge is not memoised, and the next one must
    # not reuse its folder (exports cached as <key>/model.onnx all have the same stem).
    attempts = itertools.count()

    def resolve(model) -> Path:
        return fixture_path(*model) if isinstance(model, tuple) else Path(model)

    def run(teacher, student, methods: Sequence[str] | str, *extra: str) -> Path:
        if isinstance(methods, str):
            methods = [methods]
        t, s = resolve(teacher), resolve(student)
        key = (str(t), str(s), tuple(methods), tuple(extra))
        if key not in done:
            out_dir = root / f"{next(attempts):03d}-{t.stem}-{s.stem}-{'+'.join(methods)}"
            out_dir.mkdir()
            out = out_dir / "joint.onnx"
            cmd = [str(kdgraph_bin), "merge", str(t), str(s), "-o", str(out)]
            for m in methods:
                cmd += ["--method", m]
            cmd += list(extra)
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            (out_dir / "merge.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0 or not out.exists():
                raise MergeError(
                    f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
                )
            done[key] = out
        return done[key]

    return run
