"""The candidate formulations of a Conv's weight gradient (and ConvTranspose for its input gradient)
on stock onnxruntime, each timed against the forward Conv of the same shape: the measurements
behind the choice in src/autodiff/rules/conv.rs (`weight_grad_form`).

    python bench/conv_weight_grad_forms.py            # the resnet18 / MobileNetV2 shapes, batch 32
    python bench/conv_weight_grad_forms.py --shape 32,64,16,16,64,3,1,1,1 --forms im2col_gemm,batch_transposed

A shape is N,C,H,W,M,k,stride,pad,group (square kernel, symmetric pads). x and dY are graph inputs;
every form's dW is checked against the first form's before timing. Ratios are of CPU time
(timing.py), the median over interleaved repetitions."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from timing import time_pair

SHAPES = {
    "resnet18 conv1 7x7 s2": "32,3,64,64,64,7,2,3,1",
    "resnet18 layer1 3x3 s1": "32,64,16,16,64,3,1,1,1",
    "resnet18 layer2 3x3 s2": "32,64,16,16,128,3,2,1,1",
    "resnet18 layer3 3x3 s1": "32,256,4,4,256,3,1,1,1",
    "resnet18 downsample 1x1 s2": "32,64,16,16,128,1,2,0,1",
    "mobilenetv2 stem 3x3 s2": "32,3,64,64,32,3,2,1,1",
    "mobilenetv2 expand 1x1": "32,24,16,16,144,1,1,0,1",
    "mobilenetv2 depthwise 3x3 s1": "32,144,16,16,144,3,1,1,144",
    "mobilenetv2 depthwise 3x3 s2": "32,96,32,32,96,3,2,1,96",
}


class Shape:
    def __init__(self, text: str):
        self.n, self.c, self.h, self.w, self.m, self.k, self.s, self.p, self.g = map(int, text.split(","))
        self.ho = (self.h + 2 * self.p - self.k) // self.s + 1
        self.wo = (self.w + 2 * self.p - self.k) // self.s + 1
        self.cg, self.mg = self.c // self.g, self.m // self.g
        self.positions, self.outputs, self.taps = self.h * self.w, self.ho * self.wo, self.k * self.k

    def sources(self, taps_first: bool) -> np.ndarray:
        """The flat input position each (output position, tap) reads; P where it reads padding."""
        table = np.full((self.outputs, self.taps), self.positions, np.int64)
        for o in range(self.outputs):
            oh, ow = divmod(o, self.wo)
            for t in range(self.taps):
                a, b = divmod(t, self.k)
                i, j = oh * self.s + a - self.p, ow * self.s + b - self.p
                if 0 <= i < self.h and 0 <= j < self.w:
                    table[o, t] = i * self.w + j
        return table.T.copy() if taps_first else table


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], **attrs)


def forward(sh: Shape):
    weight = numpy_helper.from_array(np.random.randn(sh.m, sh.cg, sh.k, sh.k).astype(np.float32), "w")
    conv = node("Conv", ["x", "w"], "dw", kernel_shape=[sh.k] * 2, strides=[sh.s] * 2, pads=[sh.p] * 4, group=sh.g)
    return [conv], [weight]


def input_grad_conv_transpose(sh: Shape):
    weight = numpy_helper.from_array(np.random.randn(sh.m, sh.cg, sh.k, sh.k).astype(np.float32), "w")
    tail = sh.h + sh.p - ((sh.ho - 1) * sh.s + sh.k)
    attrs = dict(
        kernel_shape=[sh.k] * 2,
        strides=[sh.s] * 2,
        pads=[sh.p, sh.p, max(-tail, 0), max(-tail, 0)],
        output_padding=[max(tail, 0)] * 2,
        group=sh.g,
    )
    return [node("ConvTranspose", ["dy", "w"], "dx", **attrs)], [weight]


def im2col_gemm(sh: Shape):
    """Channels-last rows, one Gather, Gemm(transA=1) over N*O (groups of 1)."""
    consts = [
        ints("flat", [0, sh.c, sh.positions]),
        ints("pads", [0, 0, 0, 0, 1, 0]),
        ints("src", sh.sources(False)),
        ints("cols", [-1, sh.taps * sh.c]),
        ints("rows", [-1, sh.m]),
        ints("kl", [sh.m, sh.k, sh.k, sh.c]),
    ]
    nodes = [
        node("Reshape", ["x", "flat"], "a"),
        node("Transpose", ["a"], "b", perm=[0, 2, 1]),
        node("Pad", ["b", "pads"], "c"),
        node("Gather", ["c", "src"], "d", axis=1),
        node("Reshape", ["d", "cols"], "e"),
        node("Transpose", ["dy"], "f", perm=[0, 2, 3, 1]),
        node("Reshape", ["f", "rows"], "g"),
        node("Gemm", ["g", "e"], "h", transA=1),
        node("Reshape", ["h", "kl"], "i"),
        node("Transpose", ["i"], "dw", perm=[0, 3, 1, 2]),
    ]
    return nodes, consts


def im2col_grouped(sh: Shape):
    """[g, N, P, Cg] rows, one Gather, one batched MatMul."""
    consts = [
        ints("flat", [0, sh.g, sh.cg, sh.positions]),
        ints("pads", [0, 0, 0, 0, 0, 0, 1, 0]),
        ints("src", sh.sources(False)),
        ints("cols", [sh.g, -1, sh.taps * sh.cg]),
        ints("dyg", [0, sh.g, sh.mg, sh.outputs]),
        ints("rows", [sh.g, sh.mg, -1]),
        ints("kl", [sh.m, sh.k, sh.k, sh.cg]),
    ]
    nodes = [
        node("Reshape", ["x", "flat"], "a"),
        node("Transpose", ["a"], "b", perm=[1, 0, 3, 2]),
        node("Pad", ["b", "pads"], "c"),
        node("Gather", ["c", "src"], "d", axis=2),
        node("Reshape", ["d", "cols"], "e"),
        node("Reshape", ["dy", "dyg"], "f"),
        node("Transpose", ["f"], "g", perm=[1, 2, 0, 3]),
        node("Reshape", ["g", "rows"], "h"),
        node("MatMul", ["h", "e"], "i"),
        node("Reshape", ["i", "kl"], "j"),
        node("Transpose", ["j"], "dw", perm=[0, 3, 1, 2]),
    ]
    return nodes, consts


def batch_transposed(sh: Shape):
    """Conv(X as [Cg, g*N, H, W], dY as [M, N, Ho, Wo], group g), strides and dilations swapped."""
    consts = [
        ints("flat", [0, sh.g, sh.cg, sh.positions]),
        ints("planes", [sh.cg, -1, sh.h, sh.w]),
        ints("starts", [0, 0]),
        ints("ends", [sh.k, sh.k]),
        ints("axes", [2, 3]),
    ]
    nodes = [
        node("Reshape", ["x", "flat"], "a"),
        node("Transpose", ["a"], "b", perm=[2, 1, 0, 3]),
        node("Reshape", ["b", "planes"], "c"),
        node("Transpose", ["dy"], "d", perm=[1, 0, 2, 3]),
        node("Conv", ["c", "d"], "e", pads=[sh.p] * 4, dilations=[sh.s] * 2, group=sh.g),
        node("Slice", ["e", "starts", "ends", "axes"], "f"),
        node("Transpose", ["f"], "dw", perm=[1, 0, 2, 3]),
    ]
    return nodes, consts


def pointwise_gemm(sh: Shape):
    """1x1: strided Slice of X, both as rows [N*O, channels], one Gemm(transA=1)."""
    consts = [
        ints("starts", [0, 0]),
        ints("ends", [sh.h, sh.w]),
        ints("axes", [2, 3]),
        ints("steps", [sh.s, sh.s]),
        ints("xrows", [-1, sh.c]),
        ints("rows", [-1, sh.m]),
        ints("dims", [sh.m, sh.c, 1, 1]),
    ]
    nodes = [
        node("Slice", ["x", "starts", "ends", "axes", "steps"], "a"),
        node("Transpose", ["a"], "b", perm=[0, 2, 3, 1]),
        node("Reshape", ["b", "xrows"], "c"),
        node("Transpose", ["dy"], "d", perm=[0, 2, 3, 1]),
        node("Reshape", ["d", "rows"], "e"),
        node("Gemm", ["e", "c"], "f", transA=1),
        node("Reshape", ["f", "dims"], "dw"),
    ]
    return nodes, consts


def pointwise_batched(sh: Shape):
    """1x1: strided Slice of X, batched MatMul [N, M, O] x [N, O, C], ReduceSum over N."""
    consts = [
        ints("starts", [0, 0]),
        ints("ends", [sh.h, sh.w]),
        ints("axes", [2, 3]),
        ints("steps", [sh.s, sh.s]),
        ints("xflat", [0, sh.c, sh.outputs]),
        ints("dyflat", [0, sh.m, sh.outputs]),
        ints("batch", [0]),
        ints("dims", [sh.m, sh.c, 1, 1]),
    ]
    nodes = [
        node("Slice", ["x", "starts", "ends", "axes", "steps"], "a"),
        node("Reshape", ["a", "xflat"], "b"),
        node("Transpose", ["b"], "c", perm=[0, 2, 1]),
        node("Reshape", ["dy", "dyflat"], "d"),
        node("MatMul", ["d", "c"], "e"),
        node("ReduceSum", ["e", "batch"], "f", keepdims=0),
        node("Reshape", ["f", "dims"], "dw"),
    ]
    return nodes, consts


def depthwise_gather_matmul(sh: Shape):
    """Depthwise: Gather [N, C, O, K] in X's own layout, MatMul with dY [N, C, 1, O], ReduceSum N."""
    consts = [
        ints("flat", [0, sh.c, sh.positions]),
        ints("pads", [0, 0, 0, 0, 0, 1]),
        ints("src", sh.sources(False)),
        ints("dyflat", [0, sh.c, 1, sh.outputs]),
        ints("batch", [0]),
        ints("dims", [sh.c, 1, sh.k, sh.k]),
    ]
    nodes = [
        node("Reshape", ["x", "flat"], "a"),
        node("Pad", ["a", "pads"], "b"),
        node("Gather", ["b", "src"], "c", axis=2),
        node("Reshape", ["dy", "dyflat"], "d"),
        node("MatMul", ["d", "c"], "e"),
        node("ReduceSum", ["e", "batch"], "f", keepdims=0),
        node("Reshape", ["f", "dims"], "dw"),
    ]
    return nodes, consts


def depthwise_gather_mul(sh: Shape):
    """Depthwise: Gather [N, C, K, O], Mul by dY [N, C, 1, O], ReduceSum over N and O."""
    consts = [
        ints("flat", [0, sh.c, sh.positions]),
        ints("pads", [0, 0, 0, 0, 0, 1]),
        ints("src", sh.sources(True)),
        ints("dyflat", [0, sh.c, 1, sh.outputs]),
        ints("axes", [0, 3]),
        ints("dims", [sh.c, 1, sh.k, sh.k]),
    ]
    nodes = [
        node("Reshape", ["x", "flat"], "a"),
        node("Pad", ["a", "pads"], "b"),
        node("Gather", ["b", "src"], "c", axis=2),
        node("Reshape", ["dy", "dyflat"], "d"),
        node("Mul", ["c", "d"], "e"),
        node("ReduceSum", ["e", "axes"], "f", keepdims=0),
        node("Reshape", ["f", "dims"], "dw"),
    ]
    return nodes, consts


FORMS = {
    "im2col_gemm": im2col_gemm,
    "im2col_grouped": im2col_grouped,
    "batch_transposed": batch_transposed,
    "pointwise_gemm": pointwise_gemm,
    "pointwise_batched": pointwise_batched,
    "depthwise_gather_matmul": depthwise_gather_matmul,
    "depthwise_gather_mul": depthwise_gather_mul,
}


def applicable(sh: Shape):
    """The forms that compute this shape's dW."""
    if sh.g == 1:
        forms = ["im2col_gemm", "im2col_grouped", "batch_transposed"]
        if sh.k == 1 and sh.p == 0:
            forms += ["pointwise_gemm", "pointwise_batched"]
        return forms
    forms = ["im2col_grouped", "batch_transposed"]
    if sh.cg == 1 and sh.mg == 1:
        forms += ["depthwise_gather_matmul", "depthwise_gather_mul"]
    return forms


def session(sh: Shape, nodes, consts, output: str) -> ort.InferenceSession:
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [sh.n, sh.c, sh.h, sh.w]),
        helper.make_tensor_value_info("dy", TensorProto.FLOAT, [sh.n, sh.m, sh.ho, sh.wo]),
    ]
    graph = helper.make_graph(nodes, "form", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(name: str, sh: Shape, forms, repeats: int) -> None:
    feed = {
        "x": np.random.randn(sh.n, sh.c, sh.h, sh.w).astype(np.float32),
        "dy": np.random.randn(sh.n, sh.m, sh.ho, sh.wo).astype(np.float32),
    }
    fwd = session(sh, *forward(sh), "dw")
    reference = None
    cells = []
    for form in forms:
        s = session(sh, *FORMS[form](sh), "dw")
        dw = s.run(["dw"], feed)[0]
        reference = dw if reference is None else reference
        assert np.allclose(dw, reference, rtol=1e-3, atol=1e-2), f"{form} disagrees"
        result = time_pair(lambda: fwd.run(None, feed), lambda: s.run(None, feed), repeats, 2)
        cells.append(f"{form} {result['cpu_ratio']:.2f}x")
    dx = session(sh, *input_grad_conv_transpose(sh), "dx")
    result = time_pair(lambda: fwd.run(None, feed), lambda: dx.run(None, feed), repeats, 2)
    cells.append(f"dX ConvTranspose {result['cpu_ratio']:.2f}x")
    print(f"{name}: " + ", ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help="N,C,H,W,M,k,stride,pad,group (default: the built-in shapes)")
    parser.add_argument("--forms", help="comma-separated (default: every form that applies)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shapes = {args.shape: args.shape} if args.shape else SHAPES
    for name, text in shapes.items():
        sh = Shape(text)
        forms = args.forms.split(",") if args.forms else applicable(sh)
        measure(name, sh, forms, args.repeats)


if __name__ == "__main__":
    main()
