"""The step graph (`merge --emit step`): its update equals torch.optim's (AdamW and SGD with
momentum, Nesterov and weight decay) for the gradients kdgraph's gradient graph computes, over
several steps with the moments carried; onnxruntime runs it.

The gradient at each step comes from the gradient graph (`--emit gradients`, judged against
torch autograd and ORT Training elsewhere) evaluated at that step's parameters, so this checks
the optimizer part alone against torch.optim."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from merge_checks import COMMITTED, PAIRS, image_batch, label_batch, session_options

STEPS = 3
BATCH = 4


def session_with_parameters(path, parameters):
    """The gradient graph with its parameters (and BN statistics) fed as inputs (initializers
    listed as graph inputs are overridable in onnxruntime)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for name in parameters:
        t = inits[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "optimizer,torch_optimizer",
    [
        (["--optimizer", "adamw", "--weight-decay", "0.05"], lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)),
        (["--optimizer", "sgd"], lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4)),
        (
            ["--optimizer", "sgd", "--nesterov", "--momentum", "0.8", "--weight-decay", "0"],
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True),
        ),
    ],
    ids=["adamw", "sgd", "sgd-nesterov"],
)
def test_step_equals_torch_optim(merge, optimizer, torch_optimizer):
    teacher, student = PAIRS[COMMITTED]
    grad_joint = merge(teacher, student, ["kd"], "--emit", "gradients")
    step_joint = merge(teacher, student, ["kd"], "--emit", "step", *optimizer)
    grad_sidecar = json.loads(grad_joint.with_suffix(".json").read_text())["gradients"]
    step_sidecar = json.loads(step_joint.with_suffix(".json").read_text())["step"]
    gradient_of = {g["parameter"]: g["output"] for g in grad_sidecar["gradients"]}
    joint = onnx.load(str(step_joint))
    initial = {t.name: onnx.numpy_helper.to_array(t) for t in joint.graph.initializer}
    carried = step_sidecar["carried"]
    values = {c["input"]: (initial[c["input"]] if c["initial"] == "initializer" else np.zeros(c["dims"], np.float32)) for c in carried}
    parameters = list(gradient_of)
    statistics = [s["statistic"] for s in grad_sidecar["state"]]

    grad_session = session_with_parameters(grad_joint.with_name("joint.grad.onnx"), parameters + statistics)
    step_session = ort.InferenceSession(str(step_joint.with_name("joint.step.onnx")), session_options(), providers=["CPUExecutionProvider"])
    step_inputs = {i.name for i in step_session.get_inputs()}

    leaves = {p: torch.tensor(values[p], dtype=torch.float64, requires_grad=True) for p in parameters}
    opt = torch_optimizer(list(leaves.values()))
    batch = {"input": image_batch(BATCH), "labels": label_batch(BATCH)}
    for step in range(1, STEPS + 1):
        feeds = {**batch, **{k: values[k] for k in parameters + statistics}}
        grads = dict(zip(parameters, grad_session.run([gradient_of[p] for p in parameters], feeds)))
        for p, leaf in leaves.items():
            leaf.grad = torch.tensor(grads[p], dtype=torch.float64)
        before_step = {p: leaf.detach().numpy().copy() for p, leaf in leaves.items()}
        opt.step()
        feeds = {**batch, **values, "lr": np.array(0.01, np.float32)}
        if "step" in step_inputs:
            feeds["step"] = np.array(step, np.int64)
        outputs = dict(zip([o.name for o in step_session.get_outputs()], step_session.run(None, {k: v for k, v in feeds.items() if k in step_inputs})))
        for c in carried:
            values[c["input"]] = outputs[c["output"]]
        for p, leaf in leaves.items():
            want = leaf.detach().numpy()
            before = before_step[p]
            # The update to 1e-4 of its size, plus the float32 rounding of the new parameter
            # (2 ulp): an update far smaller than the parameter cannot be exact in float32.
            allowed = 1e-4 * np.linalg.norm(want - before) + np.linalg.norm(2 * np.finfo(np.float32).eps * np.abs(want))
            error = np.linalg.norm(values[p].astype(np.float64) - want)
            assert error <= allowed, f"step {step}: {p}: differs from torch.optim by {error:.2e} (allowed {allowed:.2e})"
            values[p] = want.astype(np.float32)  # continue from torch's parameters: no drift between the two
