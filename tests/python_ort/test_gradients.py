"""Checks 2 and 3 of issue 11: kdgraph's gradient graphs on stock onnxruntime give torch autograd's gradients and running statistics (torchvision models) and ORT Training's gradients (joint graphs), per parameter to 1e-4 relative."""

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
    floor = gc.float32_floor(ref["gradient"], ref["gradient32"])
    bad = gc.mismatches(got, ref["gradient"], outputs, zero_fraction=gc.ZERO_FRACTION, floor=floor)
    assert not bad, gc.report(f"{case_id} gradients", bad, len(ref["gradient"]))
    state_floor = gc.float32_floor(ref["state"], ref["state32"])
    bad = gc.mismatches(got, ref["state"], state_outputs, floor=state_floor)
    assert not bad, gc.report(f"{case_id} running statistics", bad, len(ref["state"]))
    widened = gc.floored(floor) + gc.floored(state_floor)
    if widened:
        warnings.warn(f"{case_id}: {len(widened)} tensors compared at {gc.FLOAT32_FLOOR:g} x their float32 floor "
                      f"(torch float32 vs float64 beyond {gc.RTOL:g}), e.g. {widened[:3]}")
