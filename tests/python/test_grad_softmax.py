"""kdgraph's gradient rules for Softmax, LogSoftmax and LayerNormalization against torch autograd
(see grad_check.py)."""

import subprocess

import numpy as np
import onnx
import pytest
import torch

from grad_check import RTOL, check_rule, kdgraph_gradients, relative_error, single_node_model

rng = np.random.default_rng(5)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(kdgraph_bin, tmp_path, op, axis):
    fn = torch.softmax if op == "Softmax" else torch.log_softmax
    check_rule(kdgraph_bin, tmp_path, op, {"x": 2 * randn(2, 3, 4)}, lambda x: fn(x, axis), attrs={"axis": axis}, opset=13)


def layer_norm(axis, epsilon):
    def fn(x, scale, bias=None):
        return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, epsilon)

    return fn


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("axis", [-1, 1, -2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_normalization(kdgraph_bin, tmp_path, opset, axis, bias):
    x = randn(2, 3, 4) + 1
    normalised = x.shape[axis:]
    params = {"x": x, "scale": randn(*normalised)}
    if bias:
        params["bias"] = randn(*normalised)
    attrs = {"axis": axis, "epsilon": 0.1}
    check_rule(kdgraph_bin, tmp_path, "LayerNormalization", params, layer_norm(axis, 0.1), attrs=attrs, opset=opset)


def test_layer_normalization_reuses_unread_statistics(kdgraph_bin, tmp_path):
    """Mean and InvStdDev outputs that the loss does not read: the rule may use them."""
    x, scale, bias = randn(3, 5) * 2, randn(5), randn(5)
    params = {"x": x, "scale": scale, "bias": bias}
    weights = randn(3, 5)
    model = single_node_model("LayerNormalization", params, {}, list(params), {"axis": -1}, [weights])
    model.graph.node[0].output.extend(["mean", "inv_std_dev"])
    got = kdgraph_gradients(kdgraph_bin, model, list(params), tmp_path)
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    y = layer_norm(-1, 1e-5)(*leaves.values())
    (y * torch.tensor(weights, dtype=torch.float64)).sum().backward()
    for name, leaf in leaves.items():
        assert relative_error(got[name], leaf.grad.numpy()) <= RTOL, name


def test_layer_normalization_statistics_in_the_loss_are_refused(kdgraph_bin, tmp_path):
    params = {"x": randn(3, 5), "scale": randn(5)}
    weights = [randn(3, 5), randn(3, 1), randn(3, 1)]
    model = single_node_model("LayerNormalization", params, {}, list(params), {}, weights)
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    args = [str(kdgraph_bin), "grad", str(source), "--loss", "loss", "--wrt", "x", "-o", str(tmp_path / "g.onnx")]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode != 0
    assert "Mean or InvStdDev" in run.stderr, run.stderr
