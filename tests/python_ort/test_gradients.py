"""Checks 2 and 3 of issue 11: kdgraph's gradient graphs on stock onnxruntime give torch autograd's gradients and running statistics (torchvision models) and ORT Training's gradients (joint graphs), per parameter to 1e-4 relative, or to what float32 can decide on that model (gradient_cases.tolerances; test_float64 judges those in float64)."""

from __future__ import annotations

import warnings

import pytest

import gradient_cases as gc


def assert_same_names(what: str, listed, reference):
    missing, extra = sorted(set(reference) - set(listed)), sorted(set(listed) - set(reference))
    assert not missing and not extra, (
        f"{what}: the reference has {len(missing)} the sidecar does not list {missing[:5]}, "
        f"the sidecar lists {len(extra)} the reference does not have {extra[:5]}"
    )


@pytest.mark.parametrize("case_id", [c.id for c in gc.all_cases()])
def test_gradients_match_reference(case_id, case, run_ort):
    """Every parameter's gradient (and, for whole models, every updated running statistic)."""
    c = case(case_id)
    ref = c.reference()
    outputs, state_outputs = c.outputs()
    assert_same_names(f"{case_id} parameters", outputs, ref["gradient"])
    if case_id.startswith("model-"):  # torch's running statistics (ORT Training does not expose its own)
        assert_same_names(f"{case_id} running statistics", state_outputs, ref["state"])
    got = run_ort(c)
    tolerance = gc.tolerances(ref)
    bad = gc.mismatches(got, ref["gradient"], outputs, zero_fraction=gc.ZERO_FRACTION, tolerance=tolerance)
    assert not bad, gc.report(f"{case_id} gradients", bad, len(ref["gradient"]))
    state_tolerance = gc.tolerances(ref, "state")
    bad = gc.mismatches(got, ref["state"], state_outputs, tolerance=state_tolerance)
    assert not bad, gc.report(f"{case_id} running statistics", bad, len(ref["state"]))
    wide = gc.widened(tolerance) + gc.widened(state_tolerance)
    if wide:
        warnings.warn(f"{case_id}: {len(wide)} tensors compared beyond {gc.RTOL:g} (float32 floor, undecided "
                      f"ReLU masks: see gradient_cases.MASK_FLOOR), e.g. {wide[:3]}")
