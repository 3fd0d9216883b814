"""Issue 9: every op form that ORT Training 1.19 cannot differentiate, alone in a tiny student.

Each student below is written with onnx.helper and holds exactly one such form on its trainable
path, as the exporters write it (names of the forms: the op, then where it comes from):

  HardSwish, HardSigmoid   mobilenet_v3 (TorchScript and torch.export): no gradient builder
  LayerNormalization       convnext / ViT, one output (TorchScript opset 17; torch.export's
                           opset 20 form with stash_type): the gradient reads outputs 1 and 2
  CastLike                 torch.export with optimize=False (attention's sqrt(head_dim) cast
                           like q): no gradient builder
  Split without axis       ViT's packed q/k/v split on axis 0, opset 17 (sizes as an input) and
                           opset 18+ (num_outputs): the gradient reads attribute `axis`
  ReduceMean               shufflenet_v2's head, mean over H, W without keepdims (TorchScript:
                           axes attribute; torch.export: axes input): ReduceMean_Grad's Expand
                           fails at run time
  Dropout                  training-mode Dropout as TorchScript writes it (training_mode input
                           true) and as torch.export writes it (RandomUniformLike < keep, Cast,
                           Div by keep, Mul): kdgraph must read it and keep it in the joint graph

The teacher is a tiny conv net (Conv-Relu-Conv/2-Relu-GAP-Gemm). For every form, `kdgraph merge
-m kd` must succeed and
  (i)  the joint graph's student output equals onnxruntime's output of the student file on the
       same input (the rewrite keeps the value; for Dropout, at ratio 0),
  (ii) ORT Training runs TRAIN_STEPS steps and the loss falls (evaluated in eval mode before and
       after, so that dropout noise does not decide it);
and for the rewrites, a sidecar note says what was rewritten (a line with "rewrote" and the op).
For Dropout the joint graph keeps the student's dropout: training-mode passes differ, eval-mode
passes are the student without dropout.

Every attribute of every joint graph carries its value in the file, zeros included (ORT reads an
absent `i` as absent, not as 0: Split's gradient fails on axis, ReduceMean's takes keepdims=1).

An op with no ORT gradient on the trainable path that kdgraph cannot rewrite (Softplus, Elu,
CumSum) is refused before anything is written: exit 1, one `error:` line naming the student file,
the node and the op. The same op off the trainable path (on the image, before any parameter)
does not stop a merge.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import train_ort
from merge_checks import attributes_without_value, says_rewritten, session_options

SIZE = 16  # input 3 x SIZE x SIZE
CLASSES = 10
WIDTH = 8
BATCH = 4
TRAIN_STEPS = 10
LR = 1e-2
VALUE_RTOL, VALUE_ATOL = 1e-5, 1e-5


# --------------------------------------------------------------------------- graph building


class Net:
    """A graph under construction: nodes, seeded initializers, and the opset it is written for."""

    def __init__(self, name: str, opset: int, seed: int = 0):
        self.name, self.opset = name, opset
        self.rng = np.random.RandomState(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.count = 0

    def init(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape, fan_in: int) -> str:
        return self.init(name, (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    def op(self, op_type: str, inputs, outputs: int = 1, name: str | None = None, **attrs):
        """Adds a node; its output name (or names, for outputs > 1)."""
        self.count += 1
        name = name or f"/{op_type.lower()}_{self.count}/{op_type}"
        outs = [f"{name}_output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def conv(self, x: str, cin: int, cout: int, prefix: str, kernel: int = 3, stride: int = 1) -> str:
        w = self.weight(f"{prefix}.weight", (cout, cin, kernel, kernel), cin * kernel * kernel)
        b = self.init(f"{prefix}.bias", (0.1 * self.rng.standard_normal(cout)).astype(np.float32))
        pad = kernel // 2
        return self.op("Conv", [x, w, b], name=f"/{prefix}/Conv", kernel_shape=[kernel, kernel],
                       strides=[stride, stride], pads=[pad] * 4)

    def linear(self, x: str, cin: int, cout: int, prefix: str, output: str | None = None) -> str:
        w = self.weight(f"{prefix}.weight", (cout, cin), cin)
        b = self.init(f"{prefix}.bias", (0.1 * self.rng.standard_normal(cout)).astype(np.float32))
        if output is None:
            return self.op("Gemm", [x, w, b], name=f"/{prefix}/Gemm", transB=1)
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [output], name=f"/{prefix}/Gemm", transB=1))
        return output

    def pool_head(self, x: str, channels: int) -> str:
        """GlobalAveragePool, Flatten, Gemm to the logits."""
        pooled = self.op("GlobalAveragePool", [x], name="/avgpool/GlobalAveragePool")
        flat = self.op("Flatten", [pooled], name="/Flatten", axis=1)
        return self.linear(flat, channels, CLASSES, "fc", output="logits")

    def model(self) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
        graph = helper.make_graph(self.nodes, self.name, [x], [y], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="kdgraph-tests")
        model.ir_version = 8 if self.opset <= 17 else 9
        onnx.checker.check_model(model, full_check=True)
        return model


def teacher() -> onnx.ModelProto:
    n = Net("teacher", 17, seed=100)
    h = n.op("Relu", [n.conv("input", 3, WIDTH, "conv1")], name="/relu1/Relu")
    h = n.op("Relu", [n.conv(h, WIDTH, 2 * WIDTH, "conv2", stride=2)], name="/relu2/Relu")
    n.pool_head(h, 2 * WIDTH)
    return n.model()


def student(name: str, opset: int, body: Callable[[Net, str], str], head: Callable[[Net, str], str] | None = None,
            pre: Callable[[Net, str], str] | None = None) -> onnx.ModelProto:
    """input [-> pre] -> conv1 -> body -> conv2/2 -> Relu -> head (default GAP, Flatten, Gemm).

    `body` maps the conv1 output ([N, WIDTH, SIZE, SIZE]) to a tensor of the same shape."""
    n = Net(name, opset, seed=1)
    x = pre(n, "input") if pre else "input"
    h = body(n, n.conv(x, 3, WIDTH, "conv1"))
    h = n.op("Relu", [n.conv(h, WIDTH, 2 * WIDTH, "conv2", stride=2)], name="/relu2/Relu")
    if head is None:
        n.pool_head(h, 2 * WIDTH)
    else:
        head(n, h)
    return n.model()


# --------------------------------------------------------------------------- the forms


def hardswish(n: Net, x: str) -> str:
    return n.op("HardSwish", [x], name="/act1/HardSwish")


def hardsigmoid(n: Net, x: str) -> str:
    """mobilenet_v3's squeeze-excitation: x * HardSigmoid(fc2(relu(fc1(mean(x)))))."""
    s = n.op("GlobalAveragePool", [x], name="/se/avgpool/GlobalAveragePool")
    s = n.op("Relu", [n.conv(s, WIDTH, 4, "se.fc1", kernel=1)], name="/se/relu/Relu")
    gate = n.op("HardSigmoid", [n.conv(s, 4, WIDTH, "se.fc2", kernel=1)], name="/se/scale_activation/HardSigmoid",
                alpha=1.0 / 6, beta=0.5)
    return n.op("Mul", [gate, x], name="/se/Mul")


def layernorm(stash_type: bool) -> Callable[[Net, str], str]:
    """convnext's channels-last LayerNorm: permute, LayerNormalization over C (one output), permute back."""

    def body(n: Net, x: str) -> str:
        t = n.op("Transpose", [x], name="/norm/Transpose", perm=[0, 2, 3, 1])
        scale = n.init("norm.weight", n.rng.uniform(0.5, 1.5, WIDTH).astype(np.float32))
        bias = n.init("norm.bias", (0.1 * n.rng.standard_normal(WIDTH)).astype(np.float32))
        attrs = dict(axis=-1, epsilon=1e-6)
        if stash_type:
            attrs["stash_type"] = 1
        y = n.op("LayerNormalization", [t, scale, bias], name="/norm/LayerNormalization", **attrs)
        return n.op("Transpose", [y], name="/norm/Transpose_1", perm=[0, 3, 1, 2])

    return body


def castlike(n: Net, x: str) -> str:
    """Attention's scaling as torch.export writes it unoptimised: x / sqrt(CastLike(C, x)), C from Shape(x)."""
    shape = n.op("Shape", [x], name="/scale/Shape")
    channels = n.op("Gather", [shape, n.init("scale.index", np.array(1, np.int64))], name="/scale/Gather", axis=0)
    c = n.op("CastLike", [channels, x], name="/scale/CastLike")
    return n.op("Div", [x, n.op("Sqrt", [c], name="/scale/Sqrt")], name="/scale/Div")


def split_no_axis(num_outputs: bool) -> Callable[[Net, str], str]:
    """ViT's q/k/v split on axis 0: channels moved first, Split without `axis`, a gate, channels back."""

    def body(n: Net, x: str) -> str:
        t = n.op("Transpose", [x], name="/attn/Transpose", perm=[1, 0, 2, 3])
        if num_outputs:
            a, b = n.op("Split", [t], outputs=2, name="/attn/Split", num_outputs=2)
        else:
            sizes = n.init("attn.split", np.array([WIDTH // 2, WIDTH // 2], np.int64))
            a, b = n.op("Split", [t, sizes], outputs=2, name="/attn/Split")
        gated = n.op("Mul", [a, n.op("Sigmoid", [b], name="/attn/Sigmoid")], name="/attn/Mul")
        both = n.op("Concat", [gated, b], name="/attn/Concat", axis=0)
        return n.op("Transpose", [both], name="/attn/Transpose_1", perm=[1, 0, 2, 3])

    return body


def identity_body(n: Net, x: str) -> str:
    return n.op("Relu", [x], name="/relu1/Relu")


def reducemean_head(axes_input: bool) -> Callable[[Net, str], str]:
    """shufflenet_v2's head: x.mean([2, 3]) (no keepdims), then the classifier."""

    def head(n: Net, x: str) -> str:
        if axes_input:
            axes = n.init("mean.axes", np.array([2, 3], np.int64))
            pooled = n.op("ReduceMean", [x, axes], name="/ReduceMean", keepdims=0)
        else:
            pooled = n.op("ReduceMean", [x], name="/ReduceMean", axes=[2, 3], keepdims=0)
        return n.linear(pooled, 2 * WIDTH, CLASSES, "fc", output="logits")

    return head


def dropout_head(kind: str, keep: float) -> Callable[[Net, str], str]:
    """mobilenet_v3's classifier: GAP, Flatten, Linear, Relu, Dropout(1 - keep), Linear.

    kind "op": Dropout(x, ratio, training_mode=true), two outputs (TorchScript, training mode);
    kind "random": Expand(0, Shape(x)) -> RandomUniformLike -> Less(keep) -> Cast -> Div(keep) -> Mul
    (torch.export, training mode)."""

    def head(n: Net, x: str) -> str:
        pooled = n.op("GlobalAveragePool", [x], name="/avgpool/GlobalAveragePool")
        flat = n.op("Flatten", [pooled], name="/Flatten", axis=1)
        hidden = n.op("Relu", [n.linear(flat, 2 * WIDTH, 4 * WIDTH, "classifier.0")], name="/classifier/classifier.1/Relu")
        if kind == "op":
            ratio = n.init("classifier.2.ratio", np.array(1.0 - keep, np.float32))
            training = n.init("classifier.2.training_mode", np.array(True))
            dropped, _ = n.op("Dropout", [hidden, ratio, training], outputs=2, name="/classifier/classifier.2/Dropout")
        else:
            p = n.init("p_cast", np.array(keep, np.float32))
            zero = n.init("val_zero", np.array(0.0, np.float32))
            shape = n.op("Shape", [hidden], name="node_Shape_dropout")
            empty = n.op("Expand", [zero, shape], name="node_empty_like")
            rands = n.op("RandomUniformLike", [empty], name="n1", high=1.0, low=0.0)
            sampled = n.op("Less", [rands, p], name="n4")
            mask = n.op("Cast", [sampled], name="node_Cast_mask", to=TensorProto.FLOAT)
            scaled = n.op("Div", [mask, p], name="node_div")
            dropped = n.op("Mul", [hidden, scaled], name="node_mul_dropout")
        return n.linear(dropped, 4 * WIDTH, CLASSES, "classifier.3", output="logits")

    return head


# id -> (opset, body, head, the op that a sidecar note must name as rewritten)
REWRITES: Dict[str, Tuple[int, Callable, Callable | None, str]] = {
    "HardSwish": (17, hardswish, None, "HardSwish"),
    "HardSigmoid": (17, hardsigmoid, None, "HardSigmoid"),
    "LayerNormalization-opset17": (17, layernorm(stash_type=False), None, "LayerNormalization"),
    "LayerNormalization-opset20": (20, layernorm(stash_type=True), None, "LayerNormalization"),
    "CastLike": (20, castlike, None, "CastLike"),
    "Split-sizes-opset17": (17, split_no_axis(num_outputs=False), None, "Split"),
    "Split-num_outputs-opset20": (20, split_no_axis(num_outputs=True), None, "Split"),
    "ReduceMean-axes-attribute": (17, identity_body, reducemean_head(axes_input=False), "ReduceMean"),
    "ReduceMean-axes-input": (20, identity_body, reducemean_head(axes_input=True), "ReduceMean"),
}
# id -> (opset, kind)
DROPOUTS = {"Dropout-op": (17, "op"), "Dropout-RandomUniformLike": (20, "random")}
DROPOUT_KEEP = 0.5


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Callable[[str, onnx.ModelProto], Path]:
    """save(name, model) -> its path in a module-wide folder (the teacher is saved as teacher.onnx)."""
    root = tmp_path_factory.mktemp("rewrites")
    onnx.save(teacher(), str(root / "teacher.onnx"))

    def save(name: str, model: onnx.ModelProto) -> Path:
        path = root / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    save.teacher = root / "teacher.onnx"
    return save


def images(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)


def labels(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed + 1000).randint(0, CLASSES, BATCH).astype(np.int64)


def run(model, feeds: Dict[str, np.ndarray], output: str = "logits") -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    taken = {i.name for i in session.get_inputs()}
    return session.run([output], {k: v for k, v in feeds.items() if k in taken})[0]


def student_nodes(joint: onnx.ModelProto) -> List[onnx.NodeProto]:
    return [n for n in joint.graph.node if not n.name.startswith(("teacher/", "kd/"))]


def check_value_kept(joint_path: Path, student_path: Path, what: str):
    """(i): the joint graph's student output is the student file's, on the same images."""
    feeds = {"input": images(3), "labels": labels(3)}
    got = run(joint_path, feeds)
    want = run(student_path, feeds)
    np.testing.assert_allclose(got, want, rtol=VALUE_RTOL, atol=VALUE_ATOL,
                               err_msg=f"{what}: the joint graph's logits are not the student's")


def train_and_check(joint_path: Path, workdir: Path, what: str) -> train_ort.Stage:
    """(ii): artifacts, TRAIN_STEPS steps on one batch; the eval-mode loss falls."""
    stage = train_ort.Stage(joint_path, workdir, lr=LR)
    feeds = {"input": images(0), "labels": labels(0)}
    before = float(stage.evaluate(feeds)["loss"])
    for _ in range(TRAIN_STEPS):
        out = stage.step(feeds)
        assert np.isfinite(float(out["loss"])), f"{what}: non-finite training loss {out['loss']}"
    after = float(stage.evaluate(feeds)["loss"])
    assert np.isfinite(after) and after < before, f"{what}: eval-mode loss did not fall in {TRAIN_STEPS} steps: {before} -> {after}"
    return stage


def check_rewrite_note(sidecar: dict, op: str, what: str):
    notes = sidecar.get("notes", [])
    assert any(says_rewritten(line, op) for line in notes), (
        f"{what}: no sidecar note says that {op} was rewritten; notes: {notes}")


# --------------------------------------------------------------------------- rewrites


@pytest.mark.parametrize("case", list(REWRITES))
def test_rewrite(case, models, merge, tmp_path):
    opset, body, head, op = REWRITES[case]
    student_path = models(case, student(case, opset, body, head))
    joint_path = merge(models.teacher, student_path, ["kd"])
    sidecar = train_ort.read_sidecar(joint_path)
    check_rewrite_note(sidecar, op, case)
    check_value_kept(joint_path, student_path, case)
    train_and_check(joint_path, tmp_path / "artifacts", case)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("case", list(DROPOUTS))
def test_training_mode_dropout(case, models, merge, tmp_path):
    """Dropout in training mode: the merge reads it; at ratio 0 the value is the student's; at
    ratio 0.5 the joint graph still drops (training passes differ), its eval mode does not (it is
    the ratio-0 student, same weights), and the loss falls."""
    opset, kind = DROPOUTS[case]
    plain_path = models(f"{case}-keep1", student(f"{case}-keep1", opset, identity_body, dropout_head(kind, 1.0)))
    check_value_kept(merge(models.teacher, plain_path, ["kd"]), plain_path, f"{case} at ratio 0")

    student_path = models(case, student(case, opset, identity_body, dropout_head(kind, DROPOUT_KEEP)))
    joint_path = merge(models.teacher, student_path, ["kd"])
    stage = train_ort.Stage(joint_path, tmp_path / "artifacts", lr=LR)
    feeds = {"input": images(0), "labels": labels(0)}

    evals = [stage.evaluate(feeds)["logits"] for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1], err_msg=f"{case}: eval-mode passes differ (dropout in eval mode)")
    np.testing.assert_allclose(evals[0], run(plain_path, feeds), rtol=VALUE_RTOL, atol=VALUE_ATOL,
                               err_msg=f"{case}: eval mode is not the student without dropout")
    trains = [stage.forward_backward(feeds)["logits"] for _ in range(3)]
    assert any(not np.array_equal(trains[0], t) for t in trains[1:]), (
        f"{case}: three training-mode passes give the same logits: the student's dropout is gone from the joint graph")
    assert not np.allclose(trains[0], evals[0], rtol=VALUE_RTOL, atol=VALUE_ATOL), (
        f"{case}: the training-mode pass equals the eval-mode one: no dropout in training")

    before = float(stage.evaluate(feeds)["loss"])
    for _ in range(TRAIN_STEPS):
        stage.step(feeds)
    after = float(stage.evaluate(feeds)["loss"])
    assert after < before, f"{case}: eval-mode loss did not fall in {TRAIN_STEPS} steps: {before} -> {after}"


def test_attributes_keep_their_values(models, merge):
    """The joint graph of every student above writes each attribute's value, zeros included
    (keepdims=0, axis=0, Gather's axis, RandomUniformLike's low=0.0)."""
    problems, merged = [], 0
    cases = [(c, REWRITES[c][0], REWRITES[c][1], REWRITES[c][2]) for c in REWRITES]
    cases += [(c, DROPOUTS[c][0], identity_body, dropout_head(DROPOUTS[c][1], DROPOUT_KEEP)) for c in DROPOUTS]
    for case, opset, body, head in cases:
        student_path = models(case, student(case, opset, body, head))
        try:
            joint_path = merge(models.teacher, student_path, ["kd"])
        except AssertionError:
            continue  # a merge that fails is the case's own test's finding
        merged += 1
        missing = attributes_without_value(onnx.load(str(joint_path)))
        if missing:
            problems.append(f"{case}: {missing}")
    assert merged, "no student merged"
    assert not problems, "attributes written without their value (proto2 needs i=0 written):\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- refused


def softplus(n: Net, x: str) -> str:
    return n.op("Softplus", [x], name="/act1/Softplus")


def elu(n: Net, x: str) -> str:
    return n.op("Elu", [x], name="/act1/Elu", alpha=1.0)


def cumsum(n: Net, x: str) -> str:
    return n.op("CumSum", [x, n.init("cumsum.axis", np.array(3, np.int64))], name="/pool/CumSum")


# id -> (body, node name, op)
REFUSED = {
    "Softplus": (softplus, "/act1/Softplus", "Softplus"),
    "Elu": (elu, "/act1/Elu", "Elu"),
    "CumSum": (cumsum, "/pool/CumSum", "CumSum"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_op_without_gradient_is_refused(case, models, kdgraph_bin, tmp_path):
    body, node, op = REFUSED[case]
    student_path = models(f"refused-{case}", student(f"refused-{case}", 17, body))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [str(kdgraph_bin), "merge", str(models.teacher), str(student_path), "-m", "kd", "-o", str(out_dir / "joint.onnx")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (
        f"{case}: exit {result.returncode}, expected 1 (refused)\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: expected one `error:` line on stderr:\n{result.stderr}"
    line = lines[0]
    for part, what in ((student_path.name, "the student file"), (node, "the node"), (op, "the op type")):
        assert part in line, f"{case}: the error does not name {what} (`{part}`): {line}"
    written = sorted(p.name for p in out_dir.iterdir())
    assert not written, f"{case}: refused, yet wrote {written}"


def test_op_without_gradient_off_the_trainable_path_is_accepted(models, merge, tmp_path):
    """Softplus on the image, before any parameter: ORT Training never differentiates it; the merge
    goes through and the joint graph trains."""
    student_path = models("softplus-on-input", student("softplus-on-input", 17, identity_body,
                                                       pre=lambda n, x: n.op("Softplus", [x], name="/pre/Softplus")))
    joint_path = merge(models.teacher, student_path, ["kd"])
    check_value_kept(joint_path, student_path, "Softplus on the input")
    train_and_check(joint_path, tmp_path / "artifacts", "Softplus on the input")
