"""kdgraph's gradient rule for Conv (input, weight and bias) against torch autograd (see grad_check.py):
strides 1-3, symmetric and asymmetric pads, auto_pad, dilations, groups (depthwise, channel
multiplier), 1x1, the 7x7 stem, 1-D, batch 1 and 2."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grad_check import check_rule

rng = np.random.default_rng(11)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def conv_fn(pads, stride, dilation, group, rank):
    """torch's Conv of ONNX pads [begin..., end...] (any, asymmetric included): F.pad then conv."""
    conv = {1: F.conv1d, 2: F.conv2d}[rank]

    def fn(x, w, b=None):
        torch_pads = []
        for d in reversed(range(rank)):
            torch_pads += [pads[d], pads[rank + d]]
        return conv(F.pad(x, torch_pads), w, b, stride=stride, dilation=dilation, groups=group)

    return fn


def same_pads(size, kernel, stride, dilation, upper):
    """ONNX auto_pad SAME_UPPER / SAME_LOWER pads [begin..., end...]."""
    begin, end = [], []
    for i, k, s, d in zip(size, kernel, stride, dilation):
        out = -(-i // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - i)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin + end


CASES = {
    # name: (batch, in channels, spatial, out channels, kernel, stride, pads, dilation, group)
    "3x3-s1-p1": (2, 4, (7, 6), 5, (3, 3), (1, 1), [1, 1, 1, 1], (1, 1), 1),
    "3x3-s2-p1": (2, 3, (9, 8), 4, (3, 3), (2, 2), [1, 1, 1, 1], (1, 1), 1),
    "3x3-s3-asym": (1, 3, (11, 10), 4, (3, 3), (3, 3), [2, 0, 1, 2], (1, 1), 1),
    "3x2-s21-dil": (2, 3, (12, 9), 2, (3, 2), (2, 1), [1, 2, 0, 1], (2, 3), 1),
    "1x1-s1": (2, 6, (5, 5), 4, (1, 1), (1, 1), [0, 0, 0, 0], (1, 1), 1),
    "1x1-s2": (2, 6, (7, 6), 4, (1, 1), (2, 2), [0, 0, 0, 0], (1, 1), 1),
    "7x7-s2-stem": (2, 3, (20, 18), 4, (7, 7), (2, 2), [3, 3, 3, 3], (1, 1), 1),
    "grouped": (2, 6, (7, 7), 4, (3, 3), (1, 1), [1, 1, 1, 1], (1, 1), 2),
    "depthwise-s1": (2, 5, (8, 7), 5, (3, 3), (1, 1), [1, 1, 1, 1], (1, 1), 5),
    "depthwise-s2": (1, 4, (9, 9), 4, (3, 3), (2, 2), [1, 1, 1, 1], (1, 1), 4),
    "depthwise-5x5-asym": (2, 3, (10, 9), 3, (5, 5), (2, 1), [2, 1, 1, 2], (1, 1), 3),
    "multiplier-2": (2, 3, (7, 8), 6, (3, 3), (2, 1), [1, 0, 1, 1], (1, 2), 3),
    # 16 input channels per group or more: the im2col and pointwise weight gradients.
    "wide-3x3-s2-asym": (2, 16, (7, 6), 8, (3, 3), (2, 2), [1, 0, 1, 1], (1, 1), 1),
    "wide-3x2-s3-dil": (1, 17, (9, 8), 3, (3, 2), (3, 1), [0, 1, 2, 0], (2, 2), 1),
    "wide-1x1-s1": (2, 16, (5, 4), 5, (1, 1), (1, 1), [0, 0, 0, 0], (1, 1), 1),
    "wide-1x1-s2": (2, 16, (7, 6), 5, (1, 1), (2, 2), [0, 0, 0, 0], (1, 1), 1),
    "wide-1x1-s2-many-positions": (2, 16, (12, 11), 5, (1, 1), (2, 2), [0, 0, 0, 0], (1, 1), 1),
    "wide-1x1-s32": (1, 20, (8, 7), 4, (1, 1), (3, 2), [0, 0, 0, 0], (1, 1), 1),
    "wide-1x1-padded": (2, 16, (5, 5), 3, (1, 1), (1, 1), [1, 0, 0, 1], (1, 1), 1),
    "wide-grouped": (2, 32, (6, 5), 4, (3, 3), (2, 1), [1, 1, 0, 1], (1, 1), 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_2d(kdgraph_bin, tmp_path, case):
    n, c, size, m, kernel, stride, pads, dilation, group = CASES[case]
    params = {"x": randn(n, c, *size), "w": randn(m, c // group, *kernel), "b": randn(m)}
    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "pads": pads, "dilations": list(dilation)}
    if group > 1:
        attrs["group"] = group
    fn = conv_fn(pads, stride, dilation, group, 2)
    check_rule(kdgraph_bin, tmp_path, "Conv", params, fn, attrs=attrs)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad(kdgraph_bin, tmp_path, mode):
    size, kernel, stride, dilation = (9, 8), (4, 3), (2, 3), (1, 1)  # odd total pads on axis 0
    params = {"x": randn(2, 3, *size), "w": randn(4, 3, *kernel)}
    if mode == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = same_pads(size, kernel, stride, dilation, mode == "SAME_UPPER")
    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "auto_pad": mode}
    check_rule(kdgraph_bin, tmp_path, "Conv", params, conv_fn(pads, stride, dilation, 1, 2), attrs=attrs)


@pytest.mark.parametrize(
    "channels,stride,pads,dilation,group",
    [(4, 1, [1, 1], 1, 1), (4, 2, [2, 0], 1, 1), (4, 3, [0, 1], 2, 1), (4, 1, [1, 1], 1, 4), (16, 2, [1, 0], 2, 1)],
    ids=["s1", "s2-asym", "s3-dil", "depthwise", "wide"],
)
def test_conv_1d(kdgraph_bin, tmp_path, channels, stride, pads, dilation, group):
    params = {"x": randn(2, channels, 13), "w": randn(4, channels // group, 3), "b": randn(4)}
    attrs = {"kernel_shape": [3], "strides": [stride], "pads": pads, "dilations": [dilation], "group": group}
    fn = conv_fn(pads, (stride,), (dilation,), group, 1)
    check_rule(kdgraph_bin, tmp_path, "Conv", params, fn, attrs=attrs)


def test_conv_weight_only(kdgraph_bin, tmp_path):
    """The input a constant (the first layer of a network): only dW, no bias."""
    x = randn(2, 3, 6, 6)
    fn = lambda w: F.conv2d(torch.tensor(x, dtype=torch.float64), w, stride=2, padding=1)
    check_rule(
        kdgraph_bin,
        tmp_path,
        "Conv",
        {"w": randn(4, 3, 3, 3)},
        fn,
        constants={"x": x},
        input_order=["x", "w"],
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    )
