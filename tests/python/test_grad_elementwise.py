"""kdgraph's gradient rules for element-wise operators against torch autograd (see grad_check.py)."""

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from grad_check import RTOL, check_rule, relative_error

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


def positive(*shape):
    return (0.5 + rng.random(shape)).astype(np.float32)


@pytest.mark.parametrize(
    "a_shape,b_shape", [((2, 3, 4), (4,)), ((3, 1), (2, 1, 4)), ((3, 4), ())], ids=["trailing", "both-stretch", "scalar"]
)
def test_div(kdgraph_bin, tmp_path, a_shape, b_shape):
    check_rule(kdgraph_bin, tmp_path, "Div", {"a": randn(*a_shape), "b": positive(*b_shape)}, torch.div)


def with_zeros(x):
    x = x.copy()
    x.flat[::5] = 0.0
    return x


UNARY = {
    "Neg": (torch.neg, lambda: randn(3, 4)),
    "Abs": (torch.abs, lambda: with_zeros(randn(3, 4))),
    "Exp": (torch.exp, lambda: randn(3, 4)),
    "Log": (torch.log, lambda: positive(3, 4)),
    "Sqrt": (torch.sqrt, lambda: positive(3, 4)),
    "Reciprocal": (torch.reciprocal, lambda: positive(3, 4) * np.sign(randn(3, 4))),
    "Sigmoid": (torch.sigmoid, lambda: 3 * randn(3, 4)),
    "Tanh": (torch.tanh, lambda: 2 * randn(3, 4)),
    "Erf": (torch.erf, lambda: randn(3, 4)),
    "Softplus": (torch.nn.functional.softplus, lambda: 3 * randn(3, 4)),
    "Relu": (torch.relu, lambda: with_zeros(randn(3, 4))),
}


@pytest.mark.parametrize("op", list(UNARY))
def test_unary(kdgraph_bin, tmp_path, op):
    fn, make = UNARY[op]
    check_rule(kdgraph_bin, tmp_path, op, {"x": make().astype(np.float32)}, fn)


@pytest.mark.parametrize("exponent", [3.0, 0.5, -1.5, 0.0])
def test_pow_constant_exponent(kdgraph_bin, tmp_path, exponent):
    x = positive(2, 5) if exponent % 1 else with_zeros(randn(2, 5))
    check_rule(
        kdgraph_bin,
        tmp_path,
        "Pow",
        {"x": x},
        lambda x: torch.pow(x, exponent),
        constants={"b": np.array(exponent, np.float32)},
        input_order=["x", "b"],
    )


def test_pow_integer_exponent(kdgraph_bin, tmp_path):
    check_rule(
        kdgraph_bin,
        tmp_path,
        "Pow",
        {"x": randn(2, 5)},
        lambda x: torch.pow(x, 3),
        constants={"b": np.array(3, np.int64)},
        input_order=["x", "b"],
    )


def test_pow_tensor_exponent(kdgraph_bin, tmp_path):
    """Zero bases under exponents 0 and 2 (torch's masks), positive bases elsewhere."""
    x = positive(2, 3, 4)
    x[0, 0, :2] = 0.0
    b = randn(4)
    b[0] = 0.0
    b[1] = 2.0
    check_rule(kdgraph_bin, tmp_path, "Pow", {"x": x, "b": b}, torch.pow)


def test_leaky_relu(kdgraph_bin, tmp_path):
    fn = lambda x: torch.nn.functional.leaky_relu(x, 0.2)
    check_rule(kdgraph_bin, tmp_path, "LeakyRelu", {"x": randn(3, 4)}, fn, attrs={"alpha": 0.2})


def test_elu(kdgraph_bin, tmp_path):
    fn = lambda x: torch.nn.functional.elu(x, 0.7)
    check_rule(kdgraph_bin, tmp_path, "Elu", {"x": randn(3, 4)}, fn, attrs={"alpha": 0.7})


def test_hard_sigmoid_torch_constants(kdgraph_bin, tmp_path):
    x = (8 * rng.random((4, 6)) - 4).astype(np.float32)
    attrs = {"alpha": 1 / 6, "beta": 0.5}
    check_rule(kdgraph_bin, tmp_path, "HardSigmoid", {"x": x}, torch.nn.functional.hardsigmoid, attrs=attrs)


def test_hard_sigmoid_default_constants(kdgraph_bin, tmp_path):
    x = (8 * rng.random((4, 6)) - 4).astype(np.float32)
    check_rule(kdgraph_bin, tmp_path, "HardSigmoid", {"x": x}, lambda x: torch.clamp(0.2 * x + 0.5, 0, 1))


def test_hard_swish(kdgraph_bin, tmp_path):
    """Away from +-3: kdgraph grad rewrites HardSwish as x * Clip(x / 6 + 0.5, 0, 1) (ort_forms),
    whose gradient at exactly +-3 follows Clip's bounds, not torch.hardswish's."""
    x = (10 * rng.random((4, 6)) - 5).astype(np.float32)
    x[0, :2] = [0.0, -3.5]
    check_rule(kdgraph_bin, tmp_path, "HardSwish", {"x": x}, torch.nn.functional.hardswish)


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (5,), (1,)], ids=["channel", "trailing", "single"])
def test_prelu(kdgraph_bin, tmp_path, slope_shape):
    fn = lambda x, slope: torch.where(x > 0, x, slope * x)
    params = {"x": with_zeros(randn(2, 3, 4, 5)), "slope": randn(*slope_shape)}
    check_rule(kdgraph_bin, tmp_path, "PRelu", params, fn)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(kdgraph_bin, tmp_path, approximate):
    fn = lambda x: torch.nn.functional.gelu(x, approximate=approximate)
    x = 3 * randn(3, 5)
    check_rule(kdgraph_bin, tmp_path, "Gelu", {"x": x}, fn, attrs={"approximate": approximate}, opset=20)


def clip_input():
    x = (4 * rng.random((3, 4)) - 2).astype(np.float32)
    x[0, :3] = [-0.5, 0.75, 0.0]
    return x


def clamp(x, low=None, high=None):
    """Clip with trainable bounds, written for torch autograd: x keeps the gradient where
    low < x < high (as torch.clamp with number bounds), a bound gets it where x reaches it (torch
    splits a tie in half between x and a tensor bound), crossed bounds give high."""
    y = x
    if low is not None:
        y = torch.where(x <= low, low, y)
    if high is not None:
        y = torch.where(x >= high, high, y)
    if low is not None and high is not None:
        y = torch.where(torch.as_tensor(low > high), high, y)
    return y


@pytest.mark.parametrize(
    "bounds", [(-0.5, 0.75), (-0.5, None), (None, 0.75)], ids=["both", "min-only", "max-only"]
)
def test_clip_constant_bounds(kdgraph_bin, tmp_path, bounds):
    low, high = bounds
    constants = {k: np.array(v, np.float32) for k, v in (("min", low), ("max", high)) if v is not None}
    order = ["x", "min" if low is not None else "", "max" if high is not None else ""]
    fn = lambda x: torch.clamp(x, low, high)
    check_rule(kdgraph_bin, tmp_path, "Clip", {"x": clip_input()}, fn, constants=constants, input_order=order, opset=13)


@pytest.mark.parametrize("bounds", [(-0.5, 0.75), (0.5, -0.5)], ids=["ordered", "crossed"])
def test_clip_trainable_bounds(kdgraph_bin, tmp_path, bounds):
    params = {"x": clip_input(), "min": np.array(bounds[0], np.float32), "max": np.array(bounds[1], np.float32)}
    check_rule(kdgraph_bin, tmp_path, "Clip", params, clamp)


def test_clip_only_bounds_trainable(kdgraph_bin, tmp_path):
    x = clip_input()
    params = {"min": np.array(-0.5, np.float32), "max": np.array(0.75, np.float32)}
    fn = lambda low, high: clamp(torch.tensor(x, dtype=torch.float64), low, high)
    check_rule(kdgraph_bin, tmp_path, "Clip", params, fn, constants={"x": x}, input_order=["x", "min", "max"])


def ties(shape, values=3):
    """Small integers: many exact ties."""
    return rng.integers(-1, values - 1, size=shape).astype(np.float32)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_two_inputs_with_ties(kdgraph_bin, tmp_path, op):
    fn = torch.maximum if op == "Max" else torch.minimum
    check_rule(kdgraph_bin, tmp_path, op, {"a": ties((2, 3, 4)), "b": ties((3, 1))}, fn)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_three_inputs_share_ties_equally(kdgraph_bin, tmp_path, op):
    def fn(*xs):
        stacked = torch.stack(torch.broadcast_tensors(*xs))
        return stacked.amax(0) if op == "Max" else stacked.amin(0)

    params = {"a": ties((2, 3, 4)), "b": ties((4,)), "c": ties((2, 1, 4))}
    check_rule(kdgraph_bin, tmp_path, op, params, fn)


def test_max_single_input(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Max", {"x": randn(3, 4)}, lambda x: x)


def test_where(kdgraph_bin, tmp_path):
    cond = rng.random((2, 3, 4)) > 0.5
    check_rule(
        kdgraph_bin,
        tmp_path,
        "Where",
        {"a": randn(3, 1), "b": randn(4)},
        lambda a, b: torch.where(torch.tensor(cond), a, b),
        constants={"cond": cond},
        input_order=["cond", "a", "b"],
    )


def test_sum_variadic(kdgraph_bin, tmp_path):
    params = {"a": randn(2, 3, 4), "b": randn(3, 1), "c": randn(4)}
    check_rule(kdgraph_bin, tmp_path, "Sum", params, lambda a, b, c: a + b + c)


def test_sum_same_input_twice(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Sum", {"a": randn(3, 4)}, lambda a: a + a, input_order=["a", "a"])


def test_mean_variadic(kdgraph_bin, tmp_path):
    params = {"a": randn(2, 3, 4), "b": randn(3, 1), "c": randn(4)}
    check_rule(kdgraph_bin, tmp_path, "Mean", params, lambda a, b, c: (a + b + c) / 3)


def run_gradient_model(kdgraph_bin, tmp_path, model, wrt, extra_outputs=()):
    """kdgraph's gradient graph of `model` run in onnxruntime: (gradient by parameter, values of
    `extra_outputs`, internal tensors of the graph exposed as outputs)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source, out = tmp_path / "model.onnx", tmp_path / "grad.onnx"
    onnx.save(model, source)
    args = [str(kdgraph_bin), "grad", str(source), "--loss", "loss", "-o", str(out)]
    for name in wrt:
        args += ["--wrt", name]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    names = {g["parameter"]: g["output"] for g in json.loads(out.with_suffix(".json").read_text())["gradients"]}
    grad_model = onnx.load(out)
    grad_model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra_outputs)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([names[p] for p in wrt] + list(extra_outputs), {})
    return dict(zip(wrt, values)), values[len(wrt) :]


def float_model(nodes, params, opset=17):
    graph = helper.make_graph(
        nodes,
        "custom",
        [],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_cast_float_to_double_and_back(kdgraph_bin, tmp_path):
    """loss = float(sum(double(x) * r)): both Casts' rules, double -> float and float -> double."""
    x, r = randn(3, 4), rng.standard_normal((3, 4))
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["xd", "r"], ["p"]),
        helper.make_node("ReduceSum", ["p"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["loss"], to=TensorProto.FLOAT),
    ]
    grads, _ = run_gradient_model(kdgraph_bin, tmp_path, float_model(nodes, {"x": x, "r": r}), ["x"])
    assert grads["x"].dtype == np.float32
    assert relative_error(grads["x"], r) <= RTOL


def test_cast_float_to_float(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Cast", {"x": randn(3, 4)}, lambda x: x, attrs={"to": TensorProto.FLOAT})


@pytest.mark.parametrize("training_mode", [None, False], ids=["absent", "false"])
def test_dropout_outside_training_is_identity(kdgraph_bin, tmp_path, training_mode):
    constants = {"ratio": np.array(0.3, np.float32)}
    order = ["x", "ratio"]
    if training_mode is not None:
        constants["training_mode"] = np.array(training_mode)
        order.append("training_mode")
    check_rule(kdgraph_bin, tmp_path, "Dropout", {"x": randn(4, 5)}, lambda x: x, constants=constants, input_order=order)


def dropout_model(x, r, ratio, with_mask):
    outputs = ["y", "mask"] if with_mask else ["y"]
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "training"], outputs),
        helper.make_node("Mul", ["y", "r"], ["p"]),
        helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0),
    ]
    constants = {"x": x, "r": r, "ratio": np.array(ratio, np.float32), "training": np.array(True)}
    return float_model(nodes, constants, opset=13)


def test_dropout_training_uses_the_forward_mask(kdgraph_bin, tmp_path):
    """In training mode the mask is random: the gradient must equal r * mask / (1 - ratio) for the
    mask the same run drew (read back as an extra output), as must y = x * mask / (1 - ratio)."""
    x, r, ratio = positive(8, 16), randn(8, 16), 0.25
    model = dropout_model(x, r, ratio, with_mask=True)
    grads, (mask, y) = run_gradient_model(kdgraph_bin, tmp_path, model, ["x"], extra_outputs=["mask", "y"])
    assert 0 < mask.sum() < mask.size, "the mask should keep some elements and drop others"
    assert relative_error(y, x * mask / (1 - ratio)) <= RTOL
    assert relative_error(grads["x"], r * mask / (1 - ratio)) <= RTOL


def test_dropout_training_without_mask_output(kdgraph_bin, tmp_path):
    """kdgraph grad adds the mask output a training-mode Dropout lacks; with x > 0 the mask the
    run drew is y != 0."""
    x, r, ratio = positive(8, 16), randn(8, 16), 0.5
    model = dropout_model(x, r, ratio, with_mask=False)
    grads, (y,) = run_gradient_model(kdgraph_bin, tmp_path, model, ["x"], extra_outputs=["y"])
    mask = y != 0
    assert 0 < mask.sum() < mask.size, "the mask should keep some elements and drop others"
    assert relative_error(grads["x"], r * mask / (1 - ratio)) <= RTOL
