"""BatchNormalization in kdgraph's gradient graphs runs in training mode: batch statistics
(biased variance) normalise, the running statistics update as torch's do (momentum 0.1, unbiased
variance), and the gradients of input, scale and shift equal torch autograd's."""

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from grad_check import relative_error, tract_run

rng = np.random.default_rng(3)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 4), (1, 2, 3, 3), (3, 5, 7)], ids=["nchw", "nc", "batch1", "ncl"])
def test_batchnorm_training_mode(kdgraph_bin, tmp_path, shape):
    channels = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    scale = rng.standard_normal(channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    mean = rng.standard_normal(channels).astype(np.float32)
    var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    weights = rng.standard_normal(shape).astype(np.float32)
    eps = 1e-3
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=eps, momentum=0.9),
        helper.make_node("Constant", [], ["r"], value=numpy_helper.from_array(weights, "r")),
        helper.make_node("Mul", ["y", "r"], ["p"]),
        helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0),
    ]
    initial = {"x": x, "scale": scale, "bias": bias, "mean": mean, "var": var}
    graph = helper.make_graph(
        nodes, "bn", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initial.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "bn.onnx")
    out = tmp_path / "grad.onnx"
    args = [str(kdgraph_bin), "grad", str(tmp_path / "bn.onnx"), "--loss", "loss", "-o", str(out)]
    for name in ("x", "scale", "bias"):
        args += ["--wrt", name]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert [s["statistic"] for s in sidecar["state"]] == ["mean", "var"]

    tx, tscale, tbias = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, scale, bias))
    running_mean = torch.tensor(mean, dtype=torch.float64)
    running_var = torch.tensor(var, dtype=torch.float64)
    y = F.batch_norm(tx, running_mean, running_var, tscale, tbias, training=True, momentum=0.1, eps=eps)
    loss = (y * torch.tensor(weights, dtype=torch.float64)).sum()
    loss.backward()
    want = {"x": tx.grad, "scale": tscale.grad, "bias": tbias.grad, "mean": running_mean, "var": running_var, "loss": loss.detach()}

    names = {g["parameter"]: g["output"] for g in sidecar["gradients"]}
    names.update({s["statistic"]: s["output"] for s in sidecar["state"]})
    names["loss"] = "loss"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(list(names.values()), {})))
    by_tract = tract_run(kdgraph_bin, out, tmp_path)
    for key, value in want.items():
        error = relative_error(got[key], value.numpy())
        assert error <= 1e-4, f"{key}: onnxruntime relative error {error:.2e}"
        error = relative_error(by_tract[names[key]], value.numpy())
        assert error <= 1e-4, f"{key}: tract relative error {error:.2e}"
