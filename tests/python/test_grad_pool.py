"""kdgraph's gradient rules for MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool against torch
autograd (see grad_check.py): overlapping windows with exact ties (dY goes to the first maximum, as
torch routes it), pads incl. asymmetric, dilations, ceil_mode, count_include_pad, 1-D, batch 1 and 2."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grad_check import check_rule

rng = np.random.default_rng(13)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def ties(*shape):
    """Small integers: most windows hold several equal maxima."""
    return rng.integers(0, 3, shape).astype(np.float32)


def torch_pads(pads):
    """ONNX pads [begin..., end...] as F.pad's list (last axis first)."""
    rank = len(pads) // 2
    out = []
    for d in reversed(range(rank)):
        out += [pads[d], pads[rank + d]]
    return out


POOL = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d)}

MAX_CASES = {
    # name: (x shape, kernel, stride, pads, dilation, ceil_mode, tied values)
    "resnet-3x3-s2-p1-ties": ((2, 3, 9, 8), (3, 3), (2, 2), [1, 1, 1, 1], (1, 1), 0, True),
    "2x2-s2": ((2, 3, 8, 6), (2, 2), (2, 2), [0, 0, 0, 0], (1, 1), 0, False),
    "3x3-s1-ties": ((1, 2, 6, 7), (3, 3), (1, 1), [0, 0, 0, 0], (1, 1), 0, True),
    "3x2-s3-asym": ((2, 2, 11, 9), (3, 2), (3, 2), [2, 0, 1, 1], (1, 1), 0, False),
    "dilated-ties": ((2, 2, 10, 9), (2, 3), (1, 2), [1, 0, 0, 2], (2, 2), 0, True),
    "ceil-3x3-s2": ((2, 2, 8, 9), (3, 3), (2, 2), [1, 1, 1, 1], (1, 1), 1, True),
    "ceil-2x2-s2-odd": ((1, 3, 7, 5), (2, 2), (2, 2), [0, 0, 0, 0], (1, 1), 1, False),
}


@pytest.mark.parametrize("case", list(MAX_CASES))
def test_max_pool(kdgraph_bin, tmp_path, case):
    shape, kernel, stride, pads, dilation, ceil, tied = MAX_CASES[case]
    x = ties(*shape) if tied else randn(*shape)
    rank = len(kernel)
    symmetric = pads[:rank] == pads[rank:]

    def fn(x):
        if symmetric:
            return POOL[rank][0](x, kernel, stride, pads[:rank], dilation, ceil_mode=bool(ceil))
        x = F.pad(x, torch_pads(pads), value=-np.inf)
        return POOL[rank][0](x, kernel, stride, 0, dilation, ceil_mode=bool(ceil))

    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "pads": pads, "dilations": list(dilation)}
    if ceil:
        attrs["ceil_mode"] = 1
    check_rule(kdgraph_bin, tmp_path, "MaxPool", {"x": x}, fn, attrs=attrs)


def test_max_pool_1d(kdgraph_bin, tmp_path):
    fn = lambda x: F.max_pool1d(x, 3, 2, 1)
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    check_rule(kdgraph_bin, tmp_path, "MaxPool", {"x": ties(2, 3, 11)}, fn, attrs=attrs)


AVG_CASES = {
    # name: (x shape, kernel, stride, pads, ceil_mode, count_include_pad)
    "2x2-s2": ((2, 3, 8, 6), (2, 2), (2, 2), [0, 0, 0, 0], 0, 0),
    "3x3-s1-p1-exclude": ((2, 2, 7, 6), (3, 3), (1, 1), [1, 1, 1, 1], 0, 0),
    "3x3-s1-p1-include": ((1, 2, 7, 6), (3, 3), (1, 1), [1, 1, 1, 1], 0, 1),
    "3x3-s2-ceil-exclude": ((2, 2, 8, 9), (3, 3), (2, 2), [1, 1, 1, 1], 1, 0),
    "3x3-s2-ceil-include": ((2, 2, 8, 9), (3, 3), (2, 2), [1, 1, 1, 1], 1, 1),
    "3x2-s3-asym-exclude": ((2, 2, 11, 9), (3, 2), (3, 2), [2, 0, 1, 1], 0, 0),
    "3x2-s3-asym-include": ((2, 2, 11, 9), (3, 2), (3, 2), [2, 0, 1, 1], 0, 1),
}


def avg_fn(kernel, stride, pads, ceil, include):
    """torch's AveragePool of ONNX pads: its own padding where symmetric; else the window sums over
    the zero-padded input divided by the window's size (count_include_pad) or its real elements."""
    rank = len(kernel)
    pool = POOL[rank][1]
    if pads[:rank] == pads[rank:]:
        return lambda x: pool(x, kernel, stride, pads[:rank], ceil_mode=bool(ceil), count_include_pad=bool(include))

    def fn(x):
        sums = pool(F.pad(x, torch_pads(pads)), kernel, stride, 0, divisor_override=1)
        if include:
            return sums / float(np.prod(kernel))
        ones = torch.ones_like(x[:1, :1])
        return sums / pool(F.pad(ones, torch_pads(pads)), kernel, stride, 0, divisor_override=1)

    return fn


@pytest.mark.parametrize("case", list(AVG_CASES))
def test_average_pool(kdgraph_bin, tmp_path, case):
    shape, kernel, stride, pads, ceil, include = AVG_CASES[case]
    attrs = {
        "kernel_shape": list(kernel),
        "strides": list(stride),
        "pads": pads,
        "ceil_mode": ceil,
        "count_include_pad": include,
    }
    fn = avg_fn(kernel, stride, pads, ceil, include)
    check_rule(kdgraph_bin, tmp_path, "AveragePool", {"x": randn(*shape)}, fn, attrs=attrs)


def test_average_pool_1d(kdgraph_bin, tmp_path):
    fn = lambda x: F.avg_pool1d(x, 3, 2, 1, count_include_pad=False)
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    check_rule(kdgraph_bin, tmp_path, "AveragePool", {"x": randn(2, 3, 10)}, fn, attrs=attrs)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7)], ids=["2d", "1d"])
def test_global_average_pool(kdgraph_bin, tmp_path, shape):
    axes = tuple(range(2, len(shape)))
    fn = lambda x: x.mean(dim=axes, keepdim=True)
    check_rule(kdgraph_bin, tmp_path, "GlobalAveragePool", {"x": randn(*shape)}, fn)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7)], ids=["2d", "1d"])
def test_global_max_pool_ties(kdgraph_bin, tmp_path, shape):
    """Every channel holds several equal maxima: dY goes to the first, as torch's max_pool routes it."""
    rank = len(shape) - 2
    fn = lambda x: POOL[rank][0](x, shape[2:])
    check_rule(kdgraph_bin, tmp_path, "GlobalMaxPool", {"x": ties(*shape)}, fn)
