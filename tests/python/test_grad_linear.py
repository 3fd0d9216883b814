"""kdgraph's gradient rules for matrix products against torch autograd (see grad_check.py)."""

import subprocess

import numpy as np
import onnx
import pytest
import torch

from grad_check import check_rule, single_node_model

rng = np.random.default_rng(5)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


MATMULS = {
    "matrices": ((3, 4), (4, 5)),
    "batch-times-matrix": ((2, 3, 4), (4, 5)),
    "matrix-times-batch": ((3, 4), (2, 4, 5)),
    "broadcast-batches": ((2, 1, 3, 4), (5, 4, 2)),
    "unit-dims": ((1, 3, 1), (2, 1, 4)),
    "vector-times-matrix": ((4,), (4, 5)),
    "vector-times-batch": ((4,), (2, 4, 5)),
    "matrix-times-vector": ((3, 4), (4,)),
    "batch-times-vector": ((2, 3, 4), (4,)),
    "vector-times-square": ((4,), (4, 4)),
}


@pytest.mark.parametrize("case", MATMULS, ids=list(MATMULS))
def test_matmul(kdgraph_bin, tmp_path, case):
    a_shape, b_shape = MATMULS[case]
    check_rule(kdgraph_bin, tmp_path, "MatMul", {"a": randn(*a_shape), "b": randn(*b_shape)}, torch.matmul)


def test_matmul_same_operand_twice(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "MatMul", {"a": randn(4, 4)}, lambda a: a @ a, input_order=["a", "a"])


def test_matmul_of_a_constant(kdgraph_bin, tmp_path):
    w = randn(4, 2)
    check_rule(kdgraph_bin, tmp_path, "MatMul", {"x": randn(2, 3, 4)},
               lambda x: x @ torch.tensor(w, dtype=torch.float64), constants={"w": w}, input_order=["x", "w"])


@pytest.mark.parametrize("c_shape", [(5,), (3, 1), (), (1, 5), (3, 5), None], ids=str)
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm(kdgraph_bin, tmp_path, trans_a, trans_b, c_shape):
    m, k, n = 3, 4, 5
    alpha, beta = 0.7, -1.3
    params = {"a": randn(k, m) if trans_a else randn(m, k), "b": randn(n, k) if trans_b else randn(k, n)}
    if c_shape is not None:
        params["c"] = randn(*c_shape)

    def fn(a, b, c=None):
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        y = alpha * a @ b
        return y if c is None else y + beta * c

    check_rule(kdgraph_bin, tmp_path, "Gemm", params, fn,
               attrs={"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b})


EINSUMS = {
    "ij,jk->ik": ((3, 4), (4, 5)),
    "bij,bjk->bik": ((2, 3, 4), (2, 4, 5)),
    "i,j->ij": ((3,), (4,)),
    "ij->ji": ((3, 4),),
    "bhqd, bhkd -> bhqk": ((2, 2, 3, 4), (2, 2, 5, 4)),
}


@pytest.mark.parametrize("equation", EINSUMS, ids=list(EINSUMS))
def test_einsum(kdgraph_bin, tmp_path, equation):
    params = {f"x{i}": randn(*shape) for i, shape in enumerate(EINSUMS[equation])}
    check_rule(kdgraph_bin, tmp_path, "Einsum", params, lambda *xs: torch.einsum(equation.replace(" ", ""), *xs),
               attrs={"equation": equation}, opset=13)


@pytest.mark.parametrize("equation", ["ij->i", "ii->i", "...ij,jk->...ik", "ij,jk"])
def test_einsum_refused(kdgraph_bin, tmp_path, equation):
    """Einsums kdgraph does not differentiate are refused with a message, not mis-differentiated."""
    shapes = {"ij->i": [(3, 4)], "ii->i": [(3, 3)], "...ij,jk->...ik": [(2, 3, 4), (4, 5)], "ij,jk": [(3, 4), (4, 5)]}
    params = {f"x{i}": randn(*s) for i, s in enumerate(shapes[equation])}
    weights = [randn(1)]
    model = single_node_model("Einsum", params, {}, list(params), {"equation": equation}, weights, 13)
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    args = [str(kdgraph_bin), "grad", str(source), "--loss", "loss", "-o", str(tmp_path / "grad.onnx"), "--wrt", "x0"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode != 0
    assert "Einsum" in run.stderr and "simple Einsums only" in run.stderr, run.stderr
