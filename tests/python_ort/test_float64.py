"""kdgraph's gradient graphs of the torchvision cases, converted to float64 and run by tract, give torch autograd's float64 gradients to 1e-6 relative: the rules' formulas, free of float32 rounding.

Why float64 too: in float32 the whole-model check is ill-conditioned. A ReLU's (or ReLU6's) backward
is a mask on the sign of its pre-activation, and a deep train-mode network's float32 forward is off
by up to ~2e-4 absolute there (torch float32 vs float64: regnet_y_400mf 2.8e-5 relative at
block4-5's BatchNorm, max 2.3e-4 absolute; onnxruntime and tract alike). Pre-activations nearer to
zero than that take either sign, depending on the engine's summation order, and one flipped mask
moves whole gradients: measured on the 64x64 ts-train cases, one or two flips give regnet_y_400mf
8.7e-2 on onnxruntime (tract: none, 5e-5), densenet121 3.3e-2, mobilenet_v2 4e-2 (tract), resnet50
1.8e-3 (both). torch float64 with each engine's own masks forced matches that engine's gradients to
its float32 floor (<= 1e-4); the same graphs in float64 match torch float64 to 1e-8 (regnet 2e-10,
resnet50 3e-12, densenet121 2e-10, mobilenet_v2 1e-8).

Converting the graph: float initializers, Constant values, Casts to float, inputs and outputs become
float64; Sigmoid (tract has no float64 kernel) becomes 1 / (1 + exp(-x)), Gemm MatMul and Add (tract's
Gemm makes its beta a float32 constant); Erf and Gelu (no float64 kernel in tract either) are computed
in float32 between two Casts: a 6e-8 relative rounding of GELU's forward value and of one factor of its
backward. The running statistics are compared at 1e-6 too: the
momentum attribute is a float32 (0.1 is 0.1 + 1.5e-9), which leaves ~3e-8 relative.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gradient_cases as gc

RTOL64 = 1e-6


def float64_graph(src, dst):
    """The graph at `src` with every float32 tensor in float64, written to `dst`."""
    model = onnx.load(str(src))
    g = model.graph

    def widen(t):
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    for t in g.initializer:
        widen(t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    g.initializer.append(numpy_helper.from_array(np.array(1.0), "float64/one"))
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
        y = n.output[0]
        if n.op_type == "Sigmoid":
            nodes += [helper.make_node("Neg", [n.input[0]], [f"{y}/float64/neg"]),
                      helper.make_node("Exp", [f"{y}/float64/neg"], [f"{y}/float64/exp"]),
                      helper.make_node("Add", [f"{y}/float64/exp", "float64/one"], [f"{y}/float64/den"]),
                      helper.make_node("Div", ["float64/one", f"{y}/float64/den"], [y])]
        elif n.op_type in ("Erf", "Gelu"):
            narrow = onnx.NodeProto()
            narrow.CopyFrom(n)
            narrow.input[0], narrow.output[0], narrow.name = f"{y}/float64/x32", f"{y}/float64/y32", f"{y}/float64/op32"
            nodes += [helper.make_node("Cast", [n.input[0]], [narrow.input[0]], f"{y}/float64/narrow", to=TensorProto.FLOAT),
                      narrow, helper.make_node("Cast", [narrow.output[0]], [y], f"{y}/float64/widen", to=TensorProto.DOUBLE)]
        elif n.op_type == "Gemm":
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert at.get("alpha", 1.0) == 1.0 and at.get("beta", 1.0) == 1.0, f"{n.name}: Gemm with alpha/beta {at}"
            a, b = n.input[0], n.input[1]
            if at.get("transA", 0):
                nodes.append(helper.make_node("Transpose", [a], [f"{y}/float64/a_t"], perm=[1, 0]))
                a = f"{y}/float64/a_t"
            if at.get("transB", 0):
                nodes.append(helper.make_node("Transpose", [b], [f"{y}/float64/b_t"], perm=[1, 0]))
                b = f"{y}/float64/b_t"
            if len(n.input) > 2 and n.input[2]:
                nodes += [helper.make_node("MatMul", [a, b], [f"{y}/float64/ab"]),
                          helper.make_node("Add", [f"{y}/float64/ab", n.input[2]], [y])]
            else:
                nodes.append(helper.make_node("MatMul", [a, b], [y]))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dst))


@pytest.mark.parametrize("case_id", [c.id for c in gc.model_cases()])
def test_float64_matches_torch(case_id, case, kdgraph_bin, tmp_path):
    c = case(case_id)
    graph = tmp_path / "grad64.onnx"
    float64_graph(c.graph, graph)
    feeds = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in c.feeds().items()}
    np.savez(tmp_path / "inputs64.npz", **feeds)
    out = tmp_path / "out64.npz"
    cmd = [str(kdgraph_bin), "run", str(graph), "--inputs", str(tmp_path / "inputs64.npz"), "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"tract cannot run the float64 graph: {run.stderr.strip()[-500:]}"
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    ref = c.reference()
    outputs, state_outputs = c.outputs()
    assert all(got[o].dtype == np.float64 for o in outputs.values()), "the float64 graph gave float32 gradients"
    # Zero to rounding in float64: below 1e-12 of the norm of all gradients.
    bad = gc.mismatches(got, ref["gradient"], outputs, rtol=RTOL64, zero_fraction=1e-12)
    assert not bad, gc.report(f"{case_id} float64 gradients", bad, len(ref["gradient"]))
    bad = gc.mismatches(got, ref["state"], state_outputs, rtol=RTOL64)
    assert not bad, gc.report(f"{case_id} float64 running statistics", bad, len(ref["state"]))
