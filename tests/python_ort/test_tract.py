"""Check 4 of issue 11: tract (`kdgraph run`) runs every gradient graph and agrees with stock onnxruntime on the loss, every gradient and every state output, to 1e-4 relative."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import gradient_cases as gc


def run_tract(kdgraph_bin, c: gc.Case, tmp_path) -> dict:
    """Every graph output by name, from `kdgraph run GRAPH --inputs inputs.npz -o out.npz`."""
    out = tmp_path / "tract.npz"
    cmd = [str(kdgraph_bin), "run", str(c.graph), "--inputs", str(c.folder / "inputs.npz"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.exists(), f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()}"
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("case_id", [c.id for c in gc.all_cases()])
def test_tract_matches_onnxruntime(case_id, case, run_ort, kdgraph_bin, tmp_path):
    c = case(case_id)
    want = run_ort(c)
    got = run_tract(kdgraph_bin, c, tmp_path)
    missing = sorted(set(want) - set(got))
    assert not missing, f"{case_id}: tract gave no value for {len(missing)} outputs, e.g. {missing[:5]}"
    parameters = c.outputs()[0]
    gradients = set(parameters.values())
    # Two float32 engines may each flip masks float32 cannot decide (gradient_cases.MASK_FLOOR).
    wide = {parameters[n]: 2 * t for n, t in gc.tolerances(c.reference()).items()}
    bad = gc.mismatches(got, {n: v for n, v in want.items() if n in gradients}, zero_fraction=gc.ZERO_FRACTION, tolerance=wide)
    # The loss terms are left out: some are float32 rounding on these untrained models (PKT ~1e-10,
    # see test_merge_methods), where two engines need not agree; the total loss is compared.
    others = {n: v for n, v in want.items() if n not in gradients and not n.startswith("loss/")}
    bad += gc.mismatches(got, others)
    assert not bad, gc.report(f"{case_id}: tract vs onnxruntime, outputs", bad, len(want))
