"""Judging kdgraph's gradient rules with torch autograd: one ONNX node, differentiated by `kdgraph grad`,
run by onnxruntime, compared with the gradient torch computes for the same function.

The node's differentiable inputs are initializers (kdgraph's parameters); the loss is
sum(y * R) with R a random constant, so every element of dy is a distinct random number."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from gradient_cases import relative_error  # noqa: F401  (re-exported to the rule tests)

RTOL = 1e-4


def single_node_model(
    op: str,
    params: Dict[str, np.ndarray],
    constants: Dict[str, np.ndarray],
    input_order: Sequence[str],
    attrs: Dict,
    weights: Sequence[np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    """`op` reading `input_order` (params and constants by name; "" for an absent optional input),
    with outputs y0, y1, ... and `loss` = sum_i sum(y_i * weights[i])."""
    outputs = [f"y{i}" for i in range(len(weights))]
    nodes = [helper.make_node(op, list(input_order), outputs, name="under_test", **attrs)]
    terms = []
    for i, w in enumerate(weights):
        nodes.append(
            helper.make_node("Constant", [], [f"r{i}"], value=numpy_helper.from_array(w.astype(np.float32), f"r{i}"))
        )
        nodes.append(helper.make_node("Mul", [f"y{i}", f"r{i}"], [f"p{i}"]))
        nodes.append(helper.make_node("ReduceSum", [f"p{i}"], [f"s{i}"], keepdims=0))
        terms.append(f"s{i}")
    if len(terms) == 1:
        nodes.append(helper.make_node("Identity", terms, ["loss"]))
    else:
        nodes.append(helper.make_node("Sum", terms, ["loss"]))
    initializers = [numpy_helper.from_array(v, k) for k, v in {**params, **constants}.items()]
    graph = helper.make_graph(
        nodes,
        f"rule_{op}",
        [],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def kdgraph_gradients(kdgraph_bin: Path, model: onnx.ModelProto, wrt: Sequence[str], tmp: Path) -> Dict[str, np.ndarray]:
    """Runs `kdgraph grad --loss loss --wrt ...` on `model` and the result in onnxruntime:
    gradient by parameter name."""
    tmp.mkdir(parents=True, exist_ok=True)
    source = tmp / "model.onnx"
    onnx.save(model, source)
    out = tmp / "grad.onnx"
    args = [str(kdgraph_bin), "grad", str(source), "--loss", "loss", "-o", str(out)]
    for name in wrt:
        args += ["--wrt", name]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    names = {g["parameter"]: g["output"] for g in sidecar["gradients"]}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    wanted = [names[p] for p in wrt]
    values = dict(zip(wrt, session.run(wanted, {})))
    for name, value in tract_run(kdgraph_bin, out, tmp).items():
        if name in wanted:
            param = wrt[wanted.index(name)]
            error = relative_error(value, values[param])
            assert error <= RTOL, f"tract and onnxruntime differ on {name}: relative error {error:.2e}"
    return values


def tract_run(kdgraph_bin: Path, model: Path, tmp: Path, inputs: Dict[str, np.ndarray] | None = None) -> Dict[str, np.ndarray]:
    """Every output of `model` as tract computes it (`kdgraph run`)."""
    feeds = tmp / "tract_inputs.npz"
    np.savez(feeds, **(inputs or {}))
    result = tmp / "tract_outputs.npz"
    run = subprocess.run(
        [str(kdgraph_bin), "run", str(model), "--inputs", str(feeds), "-o", str(result)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"tract cannot run {model.name}: {run.stderr}"
    with np.load(result) as arrays:
        return {k: arrays[k] for k in arrays.files}


def check_rule(
    kdgraph_bin: Path,
    tmp: Path,
    op: str,
    params: Dict[str, np.ndarray],
    torch_fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    *,
    constants: Dict[str, np.ndarray] | None = None,
    input_order: Sequence[str] | None = None,
    attrs: Dict | None = None,
    opset: int = 17,
    rtol: float = RTOL,
    seed: int = 0,
) -> None:
    """Asserts that kdgraph's gradient of `op` equals torch autograd's for every parameter.
    `torch_fn` takes the parameters as torch tensors (in `params` order) and returns the node's
    outputs (one tensor or a tuple)."""
    constants = constants or {}
    attrs = attrs or {}
    order = list(input_order) if input_order is not None else list(params)
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    result = torch_fn(*leaves.values())
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(tuple(o.shape)).astype(np.float32) for o in outputs]
    loss = sum((o * torch.tensor(w, dtype=torch.float64)).sum() for o, w in zip(outputs, weights))
    loss.backward()
    model = single_node_model(op, params, constants, order, attrs, weights, opset)
    got = kdgraph_gradients(kdgraph_bin, model, list(params), tmp)
    for name, leaf in leaves.items():
        want = leaf.grad.numpy()
        assert got[name].shape == want.shape, f"{op} d/d{name}: shape {got[name].shape} != {want.shape}"
        error = relative_error(got[name], want)
        assert error <= rtol, f"{op} d/d{name}: relative error {error:.2e} > {rtol:.0e}"
