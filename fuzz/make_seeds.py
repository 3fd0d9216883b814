"""Writes the small seed corpus of the fuzz target (a few KB of tiny ONNX models) into fuzz/seeds."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent / "seeds"
RNG = np.random.default_rng(0)


def weight(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.1, name)


def conv_net(name, size=8, classes=10, batchnorm=True, residual=True):
    """stem conv (+BN) + ReLU, a residual block, a stride-2 conv stage, pool, Gemm."""
    nodes, inits = [], []

    def conv(x, out, cin, cout, stride=1):
        inits.append(weight(f"{out}.w", cout, cin, 3, 3))
        nodes.append(helper.make_node("Conv", [x, f"{out}.w"], [out], pads=[1, 1, 1, 1], strides=[stride, stride]))
        if not batchnorm:
            return out
        for p, v in [("g", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)]:
            inits.append(numpy_helper.from_array(np.full(cout, v, np.float32), f"{out}.{p}"))
        nodes.append(helper.make_node("BatchNormalization", [out, f"{out}.g", f"{out}.b", f"{out}.m", f"{out}.v"], [out + "_bn"]))
        return out + "_bn"

    x = conv("input", "stem", 3, 4)
    nodes.append(helper.make_node("Relu", [x], ["stem_relu"]))
    y = conv("stem_relu", "block", 4, 4)
    if residual:
        nodes.append(helper.make_node("Add", [y, "stem_relu"], ["block_sum"]))
        y = "block_sum"
    nodes.append(helper.make_node("Relu", [y], ["stage1"]))
    z = conv("stage1", "down", 4, 8, stride=2)
    nodes.append(helper.make_node("Relu", [z], ["stage2"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["stage2"], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"]))
    inits += [weight("fc.w", classes, 8), weight("fc.b", classes)]
    nodes.append(helper.make_node("Gemm", ["embedding", "fc.w", "fc.b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main():
    OUT.mkdir(exist_ok=True)
    seeds = {
        "conv_bn_residual": conv_net("a"),
        "conv_folded": conv_net("b", batchnorm=False),
        "conv_plain_16": conv_net("c", size=16, residual=False),
    }
    for name, model in seeds.items():
        onnx.checker.check_model(model)
        onnx.save(model, str(OUT / f"{name}.onnx"))


if __name__ == "__main__":
    main()
