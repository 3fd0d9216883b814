"""kdgraph's gradient rules for shape, selection and copy operators against torch autograd (see grad_check.py)."""

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from grad_check import RTOL, kdgraph_gradients, relative_error, single_node_model, check_rule

rng = np.random.default_rng(11)
INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def ints(*values):
    return np.array(values, dtype=np.int64)


def check_with_unread_outputs(kdgraph_bin, tmp, op, params, torch_fn, reads, *, constants, attrs, opset=17):
    """check_rule for a node whose outputs the loss reads where `reads` is True only (TopK's
    indices, Split pieces left unused); `torch_fn` returns the read outputs."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    outputs = torch_fn(*leaves.values())
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    weights = [rng.standard_normal(tuple(o.shape)).astype(np.float32) for o in outputs]
    sum((o * torch.tensor(w, dtype=torch.float64)).sum() for o, w in zip(outputs, weights)).backward()
    model = single_node_model(op, params, constants, list(params) + list(constants), attrs, weights, opset)
    add_instead_of_sum(model)
    read = iter(f"y{i}" for i in range(len(weights)))
    node_outputs = [next(read) if r else f"unread{i}" for i, r in enumerate(reads)]
    del model.graph.node[0].output[:]
    model.graph.node[0].output.extend(node_outputs)
    got = kdgraph_gradients(kdgraph_bin, model, list(params), tmp)
    for name, leaf in leaves.items():
        assert got[name].shape == leaf.grad.shape
        error = relative_error(got[name], leaf.grad.numpy())
        assert error <= RTOL, f"{op} d/d{name}: relative error {error:.2e}"


def add_instead_of_sum(model):
    """The loss of several outputs as a chain of Adds instead of one Sum (kdgraph's Sum rule lives
    elsewhere)."""
    graph = model.graph
    total = graph.node[-1]
    if total.op_type != "Sum":
        return
    terms = list(total.input)
    graph.node.remove(total)
    for i, term in enumerate(terms[1:]):
        out = "loss" if i == len(terms) - 2 else f"partial{i}"
        graph.node.append(helper.make_node("Add", [terms[0] if i == 0 else f"partial{i - 1}", term], [out]))


def positions(start, end, step, dim):
    """The indices Python's slicing reads (the reference for ONNX Slice's clamping)."""
    return torch.tensor(list(range(*slice(int(start), int(end), int(step)).indices(dim))), dtype=torch.long)


@pytest.mark.parametrize("opset", [13, 18])
def test_reshape(kdgraph_bin, tmp_path, opset):
    check_rule(kdgraph_bin, tmp_path, "Reshape", {"x": randn(2, 3, 4)}, lambda x: x.reshape(4, -1),
               constants={"shape": ints(4, -1)}, input_order=["x", "shape"], opset=opset)


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_flatten(kdgraph_bin, tmp_path, axis):
    shape = (2, 3, 4, 5)
    split = axis % 4 if axis != 0 else 0
    outer = int(np.prod(shape[:split]))
    check_rule(kdgraph_bin, tmp_path, "Flatten", {"x": randn(*shape)}, lambda x: x.reshape(outer, -1),
               attrs={"axis": axis})


def test_squeeze_axes_input(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Squeeze", {"x": randn(3, 1, 4, 1)}, lambda x: x.squeeze(-1).squeeze(1),
               constants={"axes": ints(1, -1)}, input_order=["x", "axes"], opset=13)


def test_unsqueeze_axes_input(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Unsqueeze", {"x": randn(3, 4)}, lambda x: x[None, :, :, None],
               constants={"axes": ints(0, -1)}, input_order=["x", "axes"], opset=13)


@pytest.mark.parametrize("perm", [[2, 0, 1], None], ids=["perm", "default"])
def test_transpose(kdgraph_bin, tmp_path, perm):
    attrs = {"perm": perm} if perm else {}
    fn = (lambda x: x.permute(*perm)) if perm else (lambda x: x.permute(2, 1, 0))
    check_rule(kdgraph_bin, tmp_path, "Transpose", {"x": randn(2, 3, 4)}, fn, attrs=attrs)


def test_concat_negative_axis_with_a_constant_input(kdgraph_bin, tmp_path):
    c = randn(2, 1, 4)
    check_rule(kdgraph_bin, tmp_path, "Concat", {"a": randn(2, 3, 4), "b": randn(2, 2, 4)},
               lambda a, b: torch.cat([a, torch.tensor(c, dtype=torch.float64), b], dim=-2),
               constants={"c": c}, input_order=["a", "c", "b"], attrs={"axis": -2})


def test_split_sizes_input(kdgraph_bin, tmp_path):
    check_with_unread_outputs(kdgraph_bin, tmp_path, "Split", {"x": randn(2, 6, 3)},
                              lambda x: torch.split(x, [1, 3, 2], dim=1), (True, True, True),
                              constants={"split": ints(1, 3, 2)}, attrs={"axis": 1}, opset=13)


def test_split_num_outputs_with_unread_pieces(kdgraph_bin, tmp_path):
    # Opset 18 num_outputs=3 along the last axis; the loss reads the first piece only.
    check_with_unread_outputs(kdgraph_bin, tmp_path, "Split", {"x": randn(2, 9)}, lambda x: x[:, :3],
                              (True, False, False), constants={}, attrs={"axis": -1, "num_outputs": 3}, opset=18)


def test_split_middle_piece_unread(kdgraph_bin, tmp_path):
    check_with_unread_outputs(kdgraph_bin, tmp_path, "Split", {"x": randn(4, 6)}, lambda x: (x[:, :1], x[:, 3:]),
                              (True, False, True), constants={"split": ints(1, 2, 3)}, attrs={"axis": 1}, opset=13)


@pytest.mark.parametrize("split,indices", [(np.array(2, np.int64), (0, 2)), (ints(1, 3, 2), (2, -3))],
                         ids=["chunk-size", "sizes-negative-index"])
def test_split_to_sequence_read_at_constant_indices(kdgraph_bin, tmp_path, split, indices):
    """torch.export's split and chunk: SplitToSequence read by SequenceAt at constant indices."""
    x = randn(2, 6, 3)
    sizes = [int(split)] * 3 if split.ndim == 0 else split.tolist()
    leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    pieces = [torch.split(leaf, sizes, dim=1)[i] for i in indices]
    weights = [rng.standard_normal(tuple(p.shape)).astype(np.float32) for p in pieces]
    sum((p * torch.tensor(w, dtype=torch.float64)).sum() for p, w in zip(pieces, weights)).backward()
    model = single_node_model("Split", {"x": x}, {"split": split}, ["x", "split"], {"axis": 1}, weights, opset=18)
    del model.graph.node[0]
    reads = [helper.make_node("SplitToSequence", ["x", "split"], ["pieces"], axis=1)]
    for i, index in enumerate(indices):
        reads.append(helper.make_node("Constant", [], [f"index{i}"], value=numpy_helper.from_array(np.array(index, np.int64))))
        reads.append(helper.make_node("SequenceAt", ["pieces", f"index{i}"], [f"y{i}"]))
    for node in reversed(reads):
        model.graph.node.insert(0, node)
    got = kdgraph_gradients(kdgraph_bin, model, ["x"], tmp_path)
    error = relative_error(got["x"], leaf.grad.numpy())
    assert error <= RTOL, f"SplitToSequence d/dx: relative error {error:.2e}"


SLICES = {
    "unit-step": ([1], [-1], [-1], None),
    "step-2": ([0, 1], [5, 7], [0, 2], [2, 3]),
    "reversed": ([-1], [INT64_MIN], [1], [-1]),
    "negative-step-clamped": ([100], [-100], [2], [-2]),
    "beyond-ends": ([-100, 2], [INT64_MAX, 100], [0, -1], [1, 1]),
}


@pytest.mark.parametrize("case", SLICES, ids=list(SLICES))
def test_slice(kdgraph_bin, tmp_path, case):
    starts, ends, axes, steps = SLICES[case]
    shape = (5, 4, 7)
    constants = {"starts": ints(*starts), "ends": ints(*ends), "axes": ints(*axes)}
    if steps is not None:
        constants["steps"] = ints(*steps)

    def fn(x):
        for start, end, axis, step in zip(starts, ends, axes, steps or [1] * len(starts)):
            axis %= len(shape)
            x = x.index_select(axis, positions(start, end, step, shape[axis]))
        return x

    check_rule(kdgraph_bin, tmp_path, "Slice", {"x": randn(*shape)}, fn, constants=constants,
               input_order=["x", *constants], opset=13)


GATHERS = {
    "axis0-repeats": (0, ints(0, 2, 0, -1, 2)),
    "axis1-matrix": (1, ints([3, -1, 0], [3, 3, 1])),
    "last-axis-scalar": (-1, np.array(2, dtype=np.int64)),
}


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("case", GATHERS, ids=list(GATHERS))
def test_gather(kdgraph_bin, tmp_path, case, opset):
    axis, indices = GATHERS[case]

    def fn(x):
        where = (slice(None),) * (axis % x.dim()) + (torch.tensor(indices),)
        return x[where]

    check_rule(kdgraph_bin, tmp_path, "Gather", {"x": randn(4, 5, 3)}, fn, constants={"indices": indices},
               input_order=["x", "indices"], attrs={"axis": axis}, opset=opset)


def test_gather_int32_indices(kdgraph_bin, tmp_path):
    indices = np.array([1, 1, -3], dtype=np.int32)
    check_rule(kdgraph_bin, tmp_path, "Gather", {"x": randn(3, 4)}, lambda x: x[torch.tensor([1, 1, 0])],
               constants={"indices": indices}, input_order=["x", "indices"], opset=13)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_gather_elements_repeats(kdgraph_bin, tmp_path, axis, opset):
    shape = (3, 4, 5)
    index_shape = list(shape)
    index_shape[axis] = 6
    indices = rng.integers(-shape[axis], shape[axis], size=index_shape).astype(np.int64)
    wrapped = torch.tensor(indices % shape[axis])
    check_rule(kdgraph_bin, tmp_path, "GatherElements", {"x": randn(*shape)},
               lambda x: torch.gather(x, axis % 3, wrapped), constants={"indices": indices},
               input_order=["x", "indices"], attrs={"axis": axis}, opset=opset)


@pytest.mark.parametrize("opset", [13, 18])
def test_gather_elements_smaller_indices(kdgraph_bin, tmp_path, opset):
    indices = rng.integers(0, 4, size=(2, 3)).astype(np.int64)
    check_rule(kdgraph_bin, tmp_path, "GatherElements", {"x": randn(3, 4)},
               lambda x: torch.gather(x, 1, torch.tensor(indices)), constants={"indices": indices},
               input_order=["x", "indices"], attrs={"axis": 1}, opset=opset)


@pytest.mark.parametrize("x_shape,shape", [((3, 1), (2, 3, 4)), ((4,), (2, 1, 4)), ((2, 1, 4), (1, 3, 1))])
def test_expand(kdgraph_bin, tmp_path, x_shape, shape):
    out = np.broadcast_shapes(x_shape, shape)
    check_rule(kdgraph_bin, tmp_path, "Expand", {"x": randn(*x_shape)}, lambda x: x.expand(*out),
               constants={"shape": ints(*shape)}, input_order=["x", "shape"])


def test_tile(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "Tile", {"x": randn(2, 3, 4)}, lambda x: x.repeat(2, 1, 3),
               constants={"repeats": ints(2, 1, 3)}, input_order=["x", "repeats"])


def torch_pad(x, c, before, after):
    """Pad with value c (differentiable in c), as ONNX Pad."""
    amounts = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
    inside = F.pad(x, amounts)
    return inside + c * F.pad(torch.zeros_like(x), amounts, value=1.0)


@pytest.mark.parametrize("opset", [13, 18])
def test_pad_constant(kdgraph_bin, tmp_path, opset):
    # Negative pads (cropping) make tract's shape inference overflow before any rule runs.
    before, after = [1, 0, 2], [2, 1, 0]
    params = {"x": randn(3, 4, 5), "c": np.array(0.7, dtype=np.float32)}
    check_rule(kdgraph_bin, tmp_path, "Pad", params, lambda x, c: torch_pad(x, c, before, after),
               constants={"pads": ints(*before, *after)}, input_order=["x", "pads", "c"], opset=opset)


def test_pad_axes_input(kdgraph_bin, tmp_path):
    # Opset 18: pads for axes [-1, 0] only.
    check_rule(kdgraph_bin, tmp_path, "Pad", {"x": randn(3, 4, 5)},
               lambda x: torch_pad(x, 0.0, [1, 0, 2], [0, 0, 3]),
               constants={"pads": ints(2, 1, 3, 0), "axes": ints(-1, 0)},
               input_order=["x", "pads", "", "axes"], opset=18)


@pytest.mark.parametrize("largest,axis", [(1, -1), (0, 0)])
def test_topk(kdgraph_bin, tmp_path, largest, axis):
    check_with_unread_outputs(kdgraph_bin, tmp_path, "TopK", {"x": randn(5, 6)},
                              lambda x: torch.topk(x, 3, dim=axis, largest=bool(largest)).values, (True, False),
                              constants={"k": ints(3)}, attrs={"axis": axis, "largest": largest})


def depth_to_space_dcr(x, b):
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(x, b):
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(kdgraph_bin, tmp_path, mode):
    fn = (lambda x: depth_to_space_dcr(x, 2)) if mode == "DCR" else (lambda x: F.pixel_shuffle(x, 2))
    check_rule(kdgraph_bin, tmp_path, "DepthToSpace", {"x": randn(2, 12, 3, 2)}, fn,
               attrs={"blocksize": 2, "mode": mode})


def test_space_to_depth(kdgraph_bin, tmp_path):
    check_rule(kdgraph_bin, tmp_path, "SpaceToDepth", {"x": randn(2, 3, 4, 6)}, lambda x: space_to_depth(x, 2),
               attrs={"blocksize": 2})


def check_symbolic_batch(kdgraph_bin, tmp, op, torch_fn, x_shape, *, constants=None, attrs=None, outputs=1,
                         inputs=None, opset=17, batch=3):
    """A rule on a batch of symbolic size: y0 = op(x * w, constants...) for a graph input x [N, *x_shape]
    and a parameter w; loss = sum(y0²). Compares d loss / d w with torch's at batch `batch`; the rule
    must read the batch size with Shape."""
    constants = constants or {}
    w = randn(*x_shape)
    x = randn(batch, *x_shape)
    node_inputs = inputs or ["t", *constants]
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["t"]),
        helper.make_node(op, node_inputs, ["y0"] + [f"unread{i}" for i in range(outputs - 1)], **(attrs or {})),
        helper.make_node("Mul", ["y0", "y0"], ["squares"]),
        helper.make_node("ReduceSum", ["squares"], ["loss"], keepdims=0),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in {"w": w, **constants}.items()]
    graph = helper.make_graph(
        nodes, f"batch_{op}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    source, out = tmp / "model.onnx", tmp / "grad.onnx"
    onnx.save(model, source)
    run = subprocess.run([str(kdgraph_bin), "grad", str(source), "--loss", "loss", "--wrt", "w", "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    gradient = json.loads(out.with_suffix(".json").read_text())["gradients"][0]["output"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run([gradient], {"x": x})[0]
    leaf = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    (torch_fn(torch.tensor(x, dtype=torch.float64) * leaf) ** 2).sum().backward()
    error = relative_error(got, leaf.grad.numpy())
    assert error <= RTOL, f"{op} d/dw at a symbolic batch: relative error {error:.2e}"


SYMBOLIC = {
    "Reshape": dict(x_shape=(2, 6), constants={"shape": ints(0, 3, 4)}, torch_fn=lambda t: t.reshape(-1, 3, 4)),
    "Concat": dict(x_shape=(2, 3), inputs=["t", "t"], attrs={"axis": 0}, torch_fn=lambda t: torch.cat([t, t])),
    "Split": dict(x_shape=(4, 3), constants={"split": ints(1, 3)}, attrs={"axis": 1}, outputs=2,
                  torch_fn=lambda t: t[:, :1], opset=13),
    "Gather": dict(x_shape=(4, 3), constants={"indices": ints([1, 1], [-1, 0])}, attrs={"axis": 1},
                   torch_fn=lambda t: t[:, torch.tensor([[1, 1], [3, 0]])], opset=13),
    "Tile": dict(x_shape=(2, 3), constants={"repeats": ints(2, 1, 2)}, torch_fn=lambda t: t.repeat(2, 1, 2)),
    "DepthToSpace": dict(x_shape=(8, 1, 2), attrs={"blocksize": 2, "mode": "CRD"},
                         torch_fn=lambda t: F.pixel_shuffle(t, 2)),
    "TopK": dict(x_shape=(5,), constants={"k": ints(2)}, outputs=2, torch_fn=lambda t: torch.topk(t, 2).values),
    "Slice": dict(x_shape=(6,), constants={"starts": ints(4), "ends": ints(0), "axes": ints(1), "steps": ints(-2)},
                  torch_fn=lambda t: t[:, [4, 2]]),
    # Along the symbolic batch axis itself: from a position to the end, and up to one from the back (CC).
    "Slice-batch-tail": dict(op="Slice", x_shape=(3,), constants={"starts": ints(1), "ends": ints(2**63 - 1), "axes": ints(0)},
                             torch_fn=lambda t: t[1:]),
    "Slice-batch-head": dict(op="Slice", x_shape=(3,), constants={"starts": ints(0), "ends": ints(-1), "axes": ints(0)},
                             torch_fn=lambda t: t[:-1]),
}


@pytest.mark.parametrize("case", SYMBOLIC)
def test_symbolic_batch(kdgraph_bin, tmp_path, case):
    case, op = dict(SYMBOLIC[case]), case
    op = case.pop("op", op)
    check_symbolic_batch(kdgraph_bin, tmp_path, op, case.pop("torch_fn"), case.pop("x_shape"), **case)
