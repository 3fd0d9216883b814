"""Issue 12, check 1: for every method on the committed pair, STEPS training steps of every stage
(parity_cases: a fixed data set, kdgraph train's batch order) give the same loss terms at every
step and the same final student weights in kdgraph train (tract, the step graph), ORT Training
(its own gradient graph and AdamW over the joint graph) and PyTorch (torch.optim.AdamW on the
fixture's own torch modules, float64, with kd_reference's losses and the graph's connector
parameters as torch leaves). PyTorch is the reference each runtime is held to; stock
onnxruntime on the step graph is judged against the same reference in
tests/python_ort/test_train_parity.py, from the case this module writes.

Init stages (AB, FT, FSP): each route trains the init stage for STEPS steps, then the main stage
from its result (what it trained, by name; a fresh optimizer), and both stages' losses are compared.
CRD: the memory banks, sample indices and contrast indices are those kdgraph train makes
(examples/train_onnxruntime.py's Crd draws the same; tests/python_ort/test_train_onnxruntime.py
checks that), fed to every route, each carrying its own updated memories and Z.

The weights compared are the student's trainable parameters (and, where PyTorch runs the student
once per step, its BatchNorm running statistics): AB and OFD tap the student before its ReLUs,
which merge_checks.torch_taps gets from a second forward pass that updates torch's running
statistics a second time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.training import onnxblock

import gradient_cases as gc
import parity_cases as P
import test_merge_methods
import test_merge_stages
import train_onnxruntime
import train_ort
from conftest import mf
from merge_checks import COMMITTED, PAIRS, PREACT_METHODS, Joint, torch_taps

TEACHER, STUDENT = PAIRS[COMMITTED]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return P.image_data(tmp_path_factory.mktemp("parity-data") / "data.npz")


def arrays(path) -> Dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def stage_joints(method: str, joint_json) -> List[Joint]:
    sidecars = [train_ort.read_sidecar(s["path"]) for s in P.stage_sidecars(joint_json)]
    return [Joint(Path(s["model_path"]), COMMITTED, (method,), s) for s in sidecars]


def crd_start(sidecar: dict) -> Dict[str, np.ndarray]:
    """CRD's first memories and Z as kdgraph train makes them (seed 0), where the stage has CRD."""
    crd = train_onnxruntime.Crd.of(sidecar)
    return crd.initial_state() if crd else {}


def crd_batch(sidecar: dict, y: np.ndarray, indices: List[int], step: int) -> Dict[str, np.ndarray]:
    crd = train_onnxruntime.Crd.of(sidecar)
    if not crd:
        return {}
    return {crd.INDEX: np.array(indices, np.int64), crd.CONTRAST: crd.contrast_index(y, indices, step)}


# --------------------------------------------------------------------------- PyTorch


def reference_terms(j: Joint, values, feeds, params: test_merge_stages.GraphParams):
    """(kd_reference's loss outputs, CRD's state outputs) with the connectors as `params`' leaves,
    in `params`' dtype."""
    method, dtype = j.methods[0], params.dtype
    if method not in test_merge_methods.METHODS:
        return test_merge_stages.reference_terms(j, values, feeds, bn_batch_stats=True, dtype=dtype, params=params)

    def regressor(_j, stage, _to):
        layer = params.convs(f"kd/fitnet/{stage}/regressor/", 1, True)[0]
        return {k: v for k, v in layer.items() if k != "bn_eps"}

    def embeds(_j, stage, _to):
        prefix = f"kd/cc/{stage}/"
        return (params.get(prefix + "embed/linear0.weight", linear=True), params.get(prefix + "embed/linear0.bias"),
                params.get(prefix + "teacher_embed/linear0.weight", linear=True), params.get(prefix + "teacher_embed/linear0.bias"))

    with mock.patch.object(test_merge_methods, "fitnet_regressor", regressor), \
            mock.patch.object(test_merge_methods, "cc_embeds", embeds):
        return test_merge_methods.reference_terms(j, values, torch.from_numpy(feeds["labels"]), bn_batch_stats=True,
                                                  dtype=dtype), {}


def pytorch_run(joints: List[Joint], x, y, log, dtype=torch.float64):
    """PyTorch's losses {(stage, step): {name: value}} and final student values (graph names)."""
    student = mf.build(STUDENT[0]).to(dtype).train()
    leaves, transposed, losses = {}, {}, {}
    for j in joints:
        stage = j.stage_name
        params = test_merge_stages.GraphParams(j, dtype, grad=True)
        for name, value in leaves.items():  # what the previous stage trained
            params.leaves[name] = value.detach().clone().requires_grad_(name in params.trainable)
            params.transposed[name] = transposed[name]
        optimizer_spec = j.sidecar["step"]["optimizer"]
        trainable = set(j.sidecar["requires_grad"])
        state, optimizer = {k: v for k, v in crd_start(j.sidecar).items()}, None
        # The student runs whole in torch; a stage graph holds only part of it (FT's init stage
        # none): the running statistics it does not carry stay as they were.
        carried = {c["input"] for c in j.sidecar["step"]["carried"]}
        kept = {n: b.clone() for n, b in student.named_buffers() if n not in carried}
        for step in range(1, P.STEPS + 1):
            indices = log[(stage, step)]["indices"]
            feeds = {"input": x[indices], "labels": y[indices], **state, **crd_batch(j.sidecar, y, indices, step)}
            values, _ = torch_taps(j, feeds["input"], ("parity", *indices), train=True, student=student)
            terms, new_state = reference_terms(j, values, feeds, params)
            if optimizer is None:
                weights = [p for n, p in student.named_parameters() if n in trainable]
                weights += list(params.trainable_leaves().values())
                optimizer = torch.optim.AdamW(weights, lr=P.LR, betas=(optimizer_spec["beta1"], optimizer_spec["beta2"]),
                                              eps=optimizer_spec["eps"], weight_decay=optimizer_spec["weight_decay"])
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            losses[(stage, step)] = {k: float(v.detach()) for k, v in terms.items()}
            state.update({k[:-len("_next")]: v.detach().float().numpy() for k, v in new_state.items()})
        with torch.no_grad():
            for n, b in student.named_buffers():
                if n in kept:
                    b.copy_(kept[n])
        leaves, transposed = dict(params.leaves), dict(params.transposed)
    final = {n: p.detach().numpy() for n, p in student.named_parameters() if n in set(joints[-1].sidecar["requires_grad"])}
    if joints[-1].methods[0] not in PREACT_METHODS:
        final.update({n: b.numpy() for n, b in student.named_buffers() if n.endswith(("running_mean", "running_var"))})
    return losses, final


# --------------------------------------------------------------------------- ORT Training


def torch_mode_adamw(folder):
    """Sets the AdamWOptimizer of ORT Training's optimizer model to torch.optim.AdamW's arithmetic
    (adam_mode 0). onnxblock's AdamW writes adam_mode 1, HuggingFace's AdamW: eps added to sqrt(v)
    before the bias correction (at step 1 an eps ~32 times larger than torch's) and the weight
    decay applied after the update. Measured on KD here: conv weights whose gradients are tiny end
    1.2e-3 to 2.3e-3 (relative) from torch.optim.AdamW's in adam_mode 1, their updates 6-8% off."""
    path = folder / "optimizer_model.onnx"
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    (mode,) = [a for a in node.attribute if a.name == "adam_mode"]
    mode.i = 0
    onnx.save(model, str(path))


def ort_training_run(joints: List[Joint], x, y, log, workdir):
    """ORT Training's losses {(stage, step): {name: value}} and final parameters, its AdamW set
    to the step graph's hyper-parameters (ORT's default has eps 1e-6 and no weight decay) and to
    torch's arithmetic (torch_mode_adamw)."""
    losses, carried = {}, None
    for j in joints:
        stage_name, spec = j.stage_name, j.sidecar["step"]["optimizer"]
        model = onnx.load(str(j.path))
        if carried:
            train_ort.carry_parameters(model, carried)
        folder = workdir / stage_name
        adamw = onnxblock.optim.AdamW(betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"], weight_decay=spec["weight_decay"])
        train_ort.generate(j.sidecar, folder, model, optimizer=adamw)
        torch_mode_adamw(folder)
        stage = train_ort.Stage(j.sidecar, folder, lr=P.LR, generated=True)
        state = crd_start(j.sidecar)
        names = P.loss_names(j.sidecar)
        for step in range(1, P.STEPS + 1):
            indices = log[(stage_name, step)]["indices"]
            out = stage.step({"input": x[indices], "labels": y[indices], **state, **crd_batch(j.sidecar, y, indices, step)})
            losses[(stage_name, step)] = {n: float(out[n]) for n in names}
            state = {k: out[k + train_ort.STATE_SUFFIX] for k in state}
        carried = stage.parameters()
    return losses, stage.parameters()


# --------------------------------------------------------------------------- the check


def write_case(method: str, joint, data, out, torch_losses, torch_final, weight_floor, kdgraph_bin):
    """CASES/<method>: what tests/python_ort/test_train_parity.py runs and compares (case.json last)."""
    folder = P.CASES / method
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in joint.parent.iterdir():
        if path.suffix in (".onnx", ".json", ".data"):
            shutil.copy(path, folder / path.name)
    shutil.copy(data, folder / "data.npz")
    shutil.copy(out / "log.jsonl", folder / "log.jsonl")
    (folder / "torch.json").write_text(json.dumps([{"stage": k[0], "step": k[1], **v} for k, v in torch_losses.items()]))
    np.savez(folder / "torch.npz", **torch_final)
    (folder / "case.json").write_text(json.dumps({"kdgraph": gc.binary_identity(kdgraph_bin), "joint": joint.with_suffix(".json").name,
                                                  "weight_floor": weight_floor}))


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(reason=P.KNOWN_MISSES[m]))
                                    if m in P.KNOWN_MISSES else m for m in P.METHODS])
def test_routes_agree(merge, kdgraph_bin, data, tmp_path, method):
    joint = merge(TEACHER, STUDENT, [method], *P.merge_args(method))
    out = tmp_path / "tract"
    out.mkdir()
    cmd = [str(kdgraph_bin), "train", *P.train_args(joint.with_suffix(".json"), data, out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    log = P.read_log(out / "log.jsonl")
    joints = stage_joints(method, joint.with_suffix(".json"))
    names = {j.stage_name: P.loss_names(j.sidecar) for j in joints}
    assert sorted(log) == sorted((j.stage_name, s) for j in joints for s in range(1, P.STEPS + 1))
    d = arrays(data)
    x, y = d["x"], d["y"]

    torch_losses, torch_final = pytorch_run(joints, x, y, log)
    losses32, final32 = pytorch_run(joints, x, y, log, torch.float32)
    for key, terms in torch_losses.items():
        terms["floor"] = {n: abs(losses32[key][n] - terms[n]) for n in names[key[0]]}
    weight_floor = {n: gc.relative_error(final32[n], w) for n, w in torch_final.items()}
    write_case(method, joint, data, out, torch_losses, torch_final, weight_floor, kdgraph_bin)
    ort_losses, ort_final = ort_training_run(joints, x, y, log, tmp_path / "ort")
    tract_final = arrays(out / "student.ckpt.npz")

    failures = [f"tract: {line}" for line in P.loss_mismatches(log, torch_losses, names)]
    failures += [f"ORT Training: {line}" for line in P.loss_mismatches(ort_losses, torch_losses, names)]
    failures += [f"tract weights: {line}" for line in P.weight_mismatches(tract_final, torch_final, weight_floor)]
    parameters = {n: v for n, v in torch_final.items() if n in joints[-1].sidecar["requires_grad"]}
    assert parameters and set(parameters) <= set(ort_final), "ORT Training lacks student parameters"
    failures += [f"ORT Training weights: {line}" for line in P.weight_mismatches(ort_final, parameters, weight_floor)]
    P.record(method, "tract", P.worst(log, torch_losses, names, tract_final, torch_final))
    P.record(method, "ORT Training", P.worst(ort_losses, torch_losses, names, ort_final, parameters))
    assert not failures, f"{method}: {len(failures)} disagreements with PyTorch:\n  " + "\n  ".join(failures[:30])
