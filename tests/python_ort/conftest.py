"""Fixtures of the stock-onnxruntime suite: the kdgraph binary, the cases the main suite wrote, and their gradient graphs run in onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import onnxruntime as ort
import pytest

# The torch-free helpers shared with the main suite (gradient_cases, kdgraph_binary).
PYTHON_SUITE = Path(__file__).resolve().parents[1] / "python"
if str(PYTHON_SUITE) not in sys.path:
    sys.path.insert(0, str(PYTHON_SUITE))

import gradient_cases as gc  # noqa: E402
from kdgraph_binary import kdgraph_bin  # noqa: E402,F401  (the fixture)

ort.set_default_logger_severity(3)


@pytest.fixture(scope="session")
def case(kdgraph_bin) -> Callable[[str], gc.Case]:
    """case(id) -> the case the main suite wrote, with a gradient graph; the test fails in one
    line where the files are missing or stale (run the main suite first) or where kdgraph could
    not write the graph (its error)."""

    def load(case_id: str) -> gc.Case:
        try:
            found, why = gc.load_case(case_id, kdgraph_bin), None
        except gc.MissingCase as missing:
            found, why = None, str(missing)
        if why:
            pytest.fail(why, pytrace=False)
        error = found.meta["kdgraph_error"]
        if error:
            pytest.fail(f"{case_id}: kdgraph wrote no gradient graph: {error}", pytrace=False)
        return found

    return load


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


@pytest.fixture(scope="session")
def run_ort() -> Callable[[gc.Case, str], Dict[str, np.ndarray]]:
    """run_ort(case, feeds="inputs") -> every output of the case's gradient graph by name, from
    stock onnxruntime on the feed file `feeds`.npz (memoised per session)."""
    done: Dict[tuple, Dict[str, np.ndarray]] = {}

    def run(c: gc.Case, feeds: str = "inputs") -> Dict[str, np.ndarray]:
        key = (c.id, feeds)
        if key not in done:
            session = ort.InferenceSession(str(c.graph), session_options(), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            values = c.feeds(feeds)
            taken = {i.name for i in session.get_inputs()}
            done[key] = dict(zip(names, session.run(names, {k: v for k, v in values.items() if k in taken})))
        return done[key]

    return run
