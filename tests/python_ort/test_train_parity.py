"""Issue 12, check 1, stock onnxruntime's part: examples/train_onnxruntime.py (the step graph in
onnxruntime's InferenceSession) on each parity case that tests/python/test_train_parity.py wrote
draws kdgraph train's batches and gives PyTorch's loss terms at every step (1e-3 relative) and its
final student weights (1e-3); parity_cases says what a case holds and why lr 1e-4."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradient_cases as gc
import parity_cases as P

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_onnxruntime.py"


def load_case(method: str, kdgraph_bin) -> Path:
    folder = P.CASES / method
    meta = folder / "case.json"
    if not meta.exists():
        pytest.fail(f"no parity case for {method} in {P.CASES}: run the main suite first ({P.MAIN_SUITE})", pytrace=False)
    if json.loads(meta.read_text())["kdgraph"] != gc.binary_identity(kdgraph_bin):
        pytest.fail(f"the parity case of {method} was written with another kdgraph build than {kdgraph_bin}: "
                    f"run the main suite first ({P.MAIN_SUITE})", pytrace=False)
    return folder


# RKD: only tract's trajectory parts (parity_cases.KNOWN_MISSES); onnxruntime agrees.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(reason=P.KNOWN_MISSES[m]))
                                    if m == "pkt" else m for m in P.METHODS])
def test_onnxruntime_agrees_with_pytorch(kdgraph_bin, tmp_path, method):
    folder = load_case(method, kdgraph_bin)
    joint = folder / json.loads((folder / "case.json").read_text())["joint"]
    cmd = [sys.executable, str(EXAMPLE), *P.train_args(joint, folder / "data.npz", tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    log, tract = P.read_log(tmp_path / "log.jsonl"), P.read_log(folder / "log.jsonl")
    assert sorted(log) == sorted(tract)
    assert all(log[key]["indices"] == tract[key]["indices"] for key in tract), "the example drew other batches than kdgraph train"
    want = {(line["stage"], line["step"]): line for line in json.loads((folder / "torch.json").read_text())}
    names = {s["stage"]: P.loss_names(s) for s in P.stage_sidecars(joint)}
    with np.load(tmp_path / "student.ckpt.npz") as got, np.load(folder / "torch.npz") as torch_final:
        got, torch_final = dict(got), dict(torch_final)
    weights = P.weight_mismatches(got, torch_final, json.loads((folder / "case.json").read_text())["weight_floor"])
    P.record(method, "onnxruntime", P.worst(log, want, names, got, torch_final))
    failures = P.loss_mismatches(log, want, names) + [f"weights: {line}" for line in weights]
    assert not failures, f"{method}: {len(failures)} disagreements with PyTorch:\n  " + "\n  ".join(failures[:30])
