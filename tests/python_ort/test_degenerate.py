"""Check 5 of issue 11: every method's gradient graph gives finite outputs on all-zero images and on a batch of one (stock onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

import gradient_cases as gc


@pytest.mark.parametrize("feeds", ["inputs-zero", "inputs-batch1"])
@pytest.mark.parametrize("case_id", [c.id for c in gc.joint_cases()])
def test_finite(case_id, feeds, case, run_ort):
    c = case(case_id)
    got = run_ort(c, feeds)
    gradients, _ = c.outputs()
    missing = sorted(set(gradients.values()) - set(got))
    assert not missing, f"{case_id}: gradient outputs missing from the graph: {missing[:5]}"
    bad = sorted(name for name, value in got.items() if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)))
    assert not bad, f"{case_id} on {feeds}: {len(bad)} of {len(got)} outputs not finite, e.g. {bad[:5]}"
