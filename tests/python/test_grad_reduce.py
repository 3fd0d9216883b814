"""kdgraph's gradient rules for reductions against torch autograd (see grad_check.py): axes as
attribute or input (by opset), negative axes, keepdims, noop_with_empty_axes, and exact ties."""

import numpy as np
import pytest
import torch

from grad_check import check_rule

rng = np.random.default_rng(11)

# op -> torch function of (x, dims, keepdim).
REDUCTIONS = {
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def axes_as_input(op, opset):
    return opset >= (13 if op == "ReduceSum" else 18)


def check_reduction(kdgraph_bin, tmp_path, op, x, axes, keepdims, opset):
    """`op` over `axes` (None: no axes given) in the form `opset` takes, against torch."""
    attrs = {"keepdims": keepdims}
    constants, order = {}, ["x"]
    if axes is not None and axes_as_input(op, opset):
        constants["axes"] = np.array(axes, np.int64)
        order.append("axes")
    elif axes is not None:
        attrs["axes"] = axes
    dims = tuple(range(x.ndim)) if axes is None else tuple(axes)
    fn = lambda x: REDUCTIONS[op](x, dims, bool(keepdims))
    check_rule(kdgraph_bin, tmp_path, op, {"x": x}, fn, constants=constants, input_order=order, attrs=attrs, opset=opset)


def ties(shape):
    """Small integers (zeros included): many exact ties, and an all-zero row for the norms."""
    x = rng.integers(-1, 2, size=shape).astype(np.float32)
    x[0, 0, :] = 0.0
    return x


CASES = [
    (13, [-1], 1),
    (13, [-1, 0], 0),
    (18, [-2], 0),
    (18, [2, -3], 1),
    (13, None, 1),
    (18, None, 0),
]


def reaches_rule(op, axes, keepdims):
    """kdgraph grad rewrites ReduceSum and ReduceMean that drop explicit axes as keepdims=1 and
    Squeeze (ort_forms), so those never reach these rules."""
    return not (op in ("ReduceSum", "ReduceMean") and axes is not None and not keepdims)


@pytest.mark.parametrize(
    "op,opset,axes,keepdims",
    [(op, *case) for op in REDUCTIONS for case in CASES if reaches_rule(op, *case[1:])],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_reduction(kdgraph_bin, tmp_path, op, opset, axes, keepdims):
    x = ties((2, 3, 4)) if op in ("ReduceMax", "ReduceMin", "ReduceL2") else rng.standard_normal((2, 3, 4))
    if op == "ReduceL1":
        x.flat[::5] = 0.0
    check_reduction(kdgraph_bin, tmp_path, op, x.astype(np.float32), axes, keepdims, opset)


@pytest.mark.parametrize("op", list(REDUCTIONS))
def test_reduction_noop_with_empty_axes(kdgraph_bin, tmp_path, op):
    """Empty axes with noop_with_empty_axes: the output is the input (the spec's words and
    onnxruntime's behaviour; onnx's reference implementation squares for ReduceSumSquare)."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    constants = {"axes": np.zeros(0, np.int64)}
    attrs = {"noop_with_empty_axes": 1}
    check_rule(kdgraph_bin, tmp_path, op, {"x": x}, lambda x: x, constants=constants, input_order=["x", "axes"], attrs=attrs, opset=18)
