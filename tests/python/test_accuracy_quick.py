"""bench/accuracy.py --quick: a student distilled with KD through each of kdgraph's routes (ORT
Training, `kdgraph train` on tract, the step graph on stock onnxruntime) reaches the accuracy that
the same distillation in PyTorch reaches, within the binomial noise of the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

# Ten classes: a route that trains nothing stays near 10%.
TRAINED = 50.0
ROUTES = ("ort", "tract", "onnxruntime", "torch")


def test_quick_accuracy_matches_pytorch(kdgraph_bin, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "KDGRAPH_BIN": str(kdgraph_bin)},
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
    assert (tmp_path / "accuracy.json").exists(), f"bench/accuracy.py --quick wrote no results\n{tail}"
    doc = json.loads((tmp_path / "accuracy.json").read_text())
    entry = doc["students"]["resnet8"]["kd"]
    assert not entry.get("not_run"), f"a route did not run: {entry['not_run']}\n{tail}"
    accuracies = {route: entry["routes"][route]["mean"] for route in ROUTES}
    assert all(a > TRAINED for a in accuracies.values()), f"a route did not train: {accuracies}\n{tail}"
    misses = {route: c for route, c in doc["quick"].items() if not c["within_noise"]}
    assert not misses and done.returncode == 0, (
        "beyond the noise bound: " + ", ".join(f"{r} - torch = {c['difference']:+.2f} (bound {c['bound']:.2f})"
                                               for r, c in misses.items()) + f"\n{tail}"
    )
    assert (tmp_path / "accuracy.png").stat().st_size > 0
