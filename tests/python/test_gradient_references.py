"""Writes the cases of issue 11's gradient checks for tests/python_ort: torch autograd on torchvision models, ORT Training on joint graphs, and kdgraph's gradient graphs for both.

The references come from outside kdgraph: torch autograd (float64) on the module that was exported
(check 2), ORT Training 1.19.2 on the joint graph that `merge --emit gradients` wrote beside the
gradient graph (check 3). Each case goes to gradient_cases.CASES/<case id> (see gradient_cases.py);
tests/python_ort runs the gradient graphs on stock onnxruntime and tract and compares. Where kdgraph
cannot write a gradient graph (an operator without a rule), the case records kdgraph's error and
tests/python_ort fails with it: this suite judges the references, not kdgraph.

The default set is gradient_cases.model_cases() / joint_cases(); KDGRAPH_HEAVY=1 adds every model,
export form, method and pair.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import gradient_cases as gc
import grad_exports
import train_ort
from conftest import MergeError
from merge_checks import graph_feeds, joint_factory, merge_args


def kdgraph_error_line(text: str) -> str:
    """kdgraph's `error: ...` line in its output (else the whole output)."""
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    return lines[-1] if lines else text.strip()


# --------------------------------------------------------------------------- check 2: whole models


def assert_export_holds(model_path: Path, model: str, names):
    """The export holds the reference module's float32 weights and running statistics under their
    state_dict names (else the reference would be for another model)."""
    inits = {i.name: i for i in onnx.load(str(model_path)).graph.initializer}
    state = grad_exports.build(model).state_dict()
    missing = sorted(n for n in names if n not in inits)
    assert not missing, f"{model_path}: no initializer for the state_dict entries {missing[:5]} ({len(missing)})"
    differ = [n for n in names if not np.array_equal(numpy_helper.to_array(inits[n]), state[n].numpy())]
    assert not differ, f"{model_path}: initializers differ from the module's state_dict: {differ[:5]}"


@pytest.mark.parametrize("case", gc.model_cases(), ids=lambda c: c.id)
def test_model_case(case: gc.ModelCase, kdgraph_bin):
    """torch's gradients and updated running statistics for the exported module (in float64, and in
    float32 for the float32 floor), and `kdgraph grad --labels`."""
    model_path = grad_exports.export(case.model, case.mode, case.size)
    x, y = grad_exports.input_batch(case.size, case.batch)
    gradients, statistics = grad_exports.torch_gradients(case.model, x, y)
    gradients32, statistics32 = grad_exports.torch_gradients(case.model, x, y, torch.float32)
    maskflip, undecided = grad_exports.mask_flip_floor(case.model, x, y, gradients)
    assert_export_holds(model_path, case.model, list(gradients) + list(statistics))
    with gc.writing(case.id) as out:
        cmd = [str(kdgraph_bin), "grad", str(model_path), "--labels", "-o", str(out / "grad.onnx")]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        np.savez(out / "inputs.npz", input=x, labels=y)
        gc.save_reference(out, gradient=gradients, state=statistics, gradient32=gradients32, state32=statistics32,
                          maskflip=maskflip)
        gc.write_meta(
            out, case=case.id, source=str(model_path),
            reference=f"torch autograd, float64, {case.model} in train mode, F.cross_entropy",
            undecided_masks=undecided,
            kdgraph=gc.binary_identity(kdgraph_bin), graph="grad.onnx", sidecar="grad.json",
            kdgraph_error=None if run.returncode == 0 else kdgraph_error_line(run.stdout + run.stderr),
        )


# --------------------------------------------------------------------------- check 3: joint graphs


@pytest.fixture(scope="module")
def joint(merge):
    return joint_factory(merge)


def ort_training_gradients(j, feeds, workdir: Path, perturbed: int = 0):
    """ORT Training's gradient of every requires_grad parameter after one forward/backward pass
    (lazy_reset_grad first): the gradient buffers themselves, which an optimizer step would read;
    an SGD step and a difference of parameters would round them. With `perturbed`, also
    {parameter: largest relative change} over that many passes on images perturbed by
    gc.PERTURBATION (relative, normal): how far float32's undecided masks move each gradient."""
    stage = train_ort.Stage(j.sidecar, workdir)

    def gradients(values):
        stage.forward_backward(values)
        found = {n: stage.gradient(n) for n in j.sidecar["requires_grad"]}
        missing = [n for n, g in found.items() if g is None]
        assert not missing, f"ORT Training holds no gradient for {missing[:5]}"
        return {n: np.array(g, copy=True) for n, g in found.items()}

    reference = gradients(feeds)
    moved = {n: 0.0 for n in reference}
    rng = np.random.default_rng(1)
    for _ in range(perturbed):
        images = feeds["input"] * (1 + gc.PERTURBATION * rng.standard_normal(feeds["input"].shape)).astype(np.float32)
        for n, g in gradients({**feeds, "input": images}).items():
            moved[n] = max(moved[n], gc.relative_error(g, reference[n]))
    return reference, moved


@pytest.mark.parametrize("case", gc.joint_cases(), ids=lambda c: c.id)
def test_joint_case(case: gc.JointCase, joint, kdgraph_bin, tmp_path):
    """`merge --emit gradients`, and ORT Training's gradients for the stage graph it wrote, on the same batch."""
    with gc.writing(case.id) as out:
        meta = dict(case=case.id, reference="ORT Training 1.19.2 (Module, lazy_reset_grad, forward/backward)",
                    kdgraph=gc.binary_identity(kdgraph_bin))
        try:
            j = joint(case.pair, case.method, *merge_args(case.method), "--emit", "gradients").stage(case.stage)
        except MergeError as failure:
            gc.write_meta(out, **meta, graph=None, sidecar=None, kdgraph_error=kdgraph_error_line(str(failure)))
            return
        listing = j.sidecar.get("gradients")
        assert listing, f"{j.path}: `merge --emit gradients` wrote no `gradients` in the sidecar"
        for name in (j.path.name, j.path.with_suffix(".json").name, listing["model"]):
            shutil.copy(j.path.parent / name, out / name)
        feeds = graph_feeds(j, case.batch)
        np.savez(out / "inputs.npz", **feeds)
        np.savez(out / "inputs-zero.npz", **graph_feeds(j, case.batch, images=np.zeros_like(feeds["input"])))
        np.savez(out / "inputs-batch1.npz", **graph_feeds(j, 1))
        gradients, moved = ort_training_gradients(j, feeds, tmp_path / "artifacts", perturbed=gc.PERTURBED_RUNS)
        gc.save_reference(out, gradient=gradients, maskflip=moved)
        gc.write_meta(out, **meta, graph=listing["model"], sidecar=j.path.with_suffix(".json").name, kdgraph_error=None)
