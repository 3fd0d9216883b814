"""bench/accuracy.py --quick: a student distilled with KD through ORT Training reaches the accuracy
that the same distillation in PyTorch reaches, within the binomial noise of the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

# Ten classes: a route that trains nothing stays near 10%.
TRAINED = 50.0


def test_quick_accuracy_matches_pytorch(kdgraph_bin, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "KDGRAPH_BIN": str(kdgraph_bin)},
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
    doc = json.loads((tmp_path / "accuracy.json").read_text())
    routes = doc["students"]["resnet8"]["kd"]
    accuracies = {route: routes[route]["mean"] for route in ("ort", "torch")}
    assert all(a > TRAINED for a in accuracies.values()), f"a route did not train: {accuracies}\n{tail}"
    check = doc["quick"]
    assert check["within_noise"] and done.returncode == 0, (
        f"ORT Training - PyTorch = {check['difference']:+.2f} points, beyond the noise bound {check['bound']:.2f}\n{tail}"
    )
    assert (tmp_path / "accuracy.png").stat().st_size > 0
