"""kdgraph's gradient rules for element-wise operators against torch autograd (see grad_check.py)."""

import numpy as np
import pytest
import torch

from grad_check import check_rule

rng = np.random.default_rng(7)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), ())],
    ids=["same", "trailing", "both-stretch", "scalar"],
)
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_binary_broadcasting(kdgraph_bin, tmp_path, op, a_shape, b_shape):
    fn = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[op]
    check_rule(kdgraph_bin, tmp_path, op, {"a": randn(*a_shape), "b": randn(*b_shape)}, fn)


def test_same_input_twice(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Mul", {"a": randn(3, 5)}, lambda a: a * a, input_order=["a", "a"])


def test_relu(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Relu", {"x": randn(4, 6)}, torch.relu)
