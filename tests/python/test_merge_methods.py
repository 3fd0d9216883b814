"""End-to-end checks of `kdgraph merge` for KD, FitNet, AT, SP, CC, PKT, RKD and NST.

1. graph contract   the joint graph and its sidecar satisfy DESIGN.md / RUNTIMES.md
2. fidelity         every loss output equals kd_reference.py on the graph's own tap tensors
                    (two non-committed pairs), plus the loss subgraph alone on synthetic taps
3. ORT Training     artifacts from the sidecar train; the teacher stays bit-identical; the
                    exported student reproduces the trained module's eval logits
4. gradients        ORT Training's gradient of the student's first conv weight equals torch
                    autograd through the PyTorch models and kd_reference
5. degenerate       batch 1 (RKD, SP, CC) and all-zero images give finite losses and gradients

The committed pair (resnet56 eval -> resnet20 train) serves the training and gradient tests;
each merge runs once per session (conftest.merge) and each artifact set once per module.
"""

from __future__ import annotations

import copy
import re
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import kd_reference as R
import ort_train
from conftest import fixture_path, mf

ort.set_default_logger_severity(3)  # generate_artifacts and the training session log at INFO

METHODS = ["kd", "fitnet", "at", "sp", "cc", "pkt", "rkd", "nst"]
# A combination, for output order and the weighting of several terms.
COMBO = ["at", "kd", "rkd"]

# (teacher (name, export mode), student (name, export mode)) by readable id.
PAIRS = {
    "resnet56-resnet20": (("resnet56", "eval"), ("resnet20", "train")),  # the committed pair
    "resnet32x4-resnet8x4": (("resnet32x4", "eval"), ("resnet8x4", "train")),
    "vgg13_bn-mobile_half": (("vgg13_bn", "eval"), ("mobile_half", "train")),
}
COMMITTED = "resnet56-resnet20"
FIDELITY_PAIRS = ["resnet32x4-resnet8x4", "vgg13_bn-mobile_half"]

NUM_CLASSES = mf.NUM_CLASSES
FIDELITY_BATCH = 4
TRAIN_BATCH = 8
TRAIN_STEPS = 30
LR = 1e-3

# Fidelity: float32 graph vs float64 reference on the same float32 tap values, rtol 1e-4.
# On these untrained models the pooled post-ReLU embeddings and the Gram rows of a batch are
# nearly parallel, so some terms are near zero (SP 1e-6..1e-12, PKT ~1e-9) and are built from
# O(1) quantities (cosines ~1, G' entries ~0.5) whose float32 rounding, ~1e-8 absolute, is
# larger than the term itself: hence atol 1e-7. Some others are ill-conditioned in float32
# whatever the graph does (KD between nearly uniform logits: 1e-2 from log-probabilities ~-4.6):
# FLOAT32_FLOOR times |reference in float32 - reference in float64| is added to the tolerance
# (compare_terms; rounding in ORT and torch differs in order, not in size). Both allowances are
# compensated elsewhere: test_loss_terms_on_synthetic_taps feeds the loss subgraph signed
# random taps on which every term is well conditioned (no atol, no floor), and
# test_rkd_accurate_in_float32 checks RKD, which a float32 graph can get right, without floor.
FID_RTOL, FID_ATOL = 1e-4, 1e-7
FLOAT32_FLOOR = 4.0
GRAD_RTOL = 1e-3
EXPORT_TOL = 1e-5


def method_id(methods: Sequence[str]) -> str:
    return "+".join(methods)


# --------------------------------------------------------------------------- joint graphs


@dataclass
class Joint:
    """One merged graph: its path, sidecar, and lazily the ONNX proto and initializers."""

    path: Path
    pair: str
    methods: Tuple[str, ...]
    sidecar: dict = field(repr=False)

    @cached_property
    def model(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))

    @cached_property
    def inits(self) -> Dict[str, onnx.TensorProto]:
        return {i.name: i for i in self.model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise KeyError(f"{self.path}: no initializer `{name}`")
        return numpy_helper.to_array(self.inits[name])

    @property
    def output_names(self) -> List[str]:
        return [o.name for o in self.model.graph.output]

    @property
    def loss_names(self) -> List[str]:
        return ort_train.loss_output_names(self.sidecar)

    def pairs(self, method: str) -> List[dict]:
        return [p for p in self.sidecar["pairs"] if p["method"] == method]

    def tap_names(self) -> List[str]:
        """Every tap tensor of the pairs (teacher ones as `teacher/<name>`), plus the logits."""
        names = []
        for p in self.sidecar["pairs"]:
            for name in (p["student"]["tensor"], "teacher/" + p["teacher"]["tensor"]):
                if name not in names:
                    names.append(name)
        for name in ort_train.student_output_names(self.sidecar):
            if name not in names:
                names.append(name)
        return names


@pytest.fixture(scope="module")
def joint(merge):
    """joint(pair_id, methods, *extra_args) -> Joint, merged once per session."""
    cache: Dict[tuple, Joint] = {}

    def get(pair: str, methods, *extra: str) -> Joint:
        methods = tuple([methods] if isinstance(methods, str) else methods)
        key = (pair, methods, extra)
        if key not in cache:
            teacher, student = PAIRS[pair]
            path = merge(teacher, student, list(methods), *extra)
            cache[key] = Joint(path, pair, methods, ort_train.load_sidecar(path))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """artifacts(joint) -> ort_train.ArtifactPaths, generated once per joint graph.

    The training and eval models return the loss, the terms and the student's outputs (the
    logits, to compare the eval-mode module with the exported student).
    """
    cache: Dict[Path, ort_train.ArtifactPaths] = {}

    def get(j: Joint) -> ort_train.ArtifactPaths:
        if j.path not in cache:
            out = tmp_path_factory.mktemp(f"artifacts-{j.pair}-{method_id(j.methods)}")
            cache[j.path] = ort_train.generate(j.sidecar, out, include_student_outputs=True)
        return cache[j.path]

    return get


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return so


def run_with_taps(model: onnx.ModelProto, names: Sequence[str], feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Runs `model` in onnxruntime with `names` added as graph outputs; {name: array} of all outputs."""
    model = copy.deepcopy(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(wanted, feeds)))


def image_batch(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((batch, *mf.INPUT_SHAPE)).astype(np.float32)


def label_batch(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed + 1000).randint(0, NUM_CLASSES, size=batch).astype(np.int64)


def expected_output_order(sidecar: dict) -> List[str]:
    """loss, loss/ce, loss/kd (KD or alpha > 0), loss/<method>..., the student's outputs."""
    methods = sidecar["methods"]
    names = ["loss", "loss/ce"]
    if sidecar["hyper"]["alpha"] > 0 or "kd" in methods:
        names.append("loss/kd")
    names += [f"loss/{m}" for m in methods if m != "kd"]
    return names + ort_train.student_output_names(sidecar)


# --------------------------------------------------------------------------- the reference


def _linear_weight(j: Joint, name: str) -> np.ndarray:
    """A Linear weight in torch layout (out, in), from the Gemm / MatMul that reads it."""
    w = j.array(name)
    for node in j.model.graph.node:
        if name in node.input:
            if node.op_type == "Gemm" and list(node.input).index(name) == 1:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                return w if trans_b else w.T
            if node.op_type == "MatMul":
                return w.T
    raise AssertionError(f"{j.path}: `{name}` is not read by a Gemm or MatMul")


def fitnet_regressor(j: Joint, stage: str, to) -> dict:
    """The FitNet regressor's initial parameters (kd/fitnet/<stage>/regressor/...) as a kd_reference dict."""
    prefix = f"kd/fitnet/{stage}/regressor/"
    names = {
        "weight": "conv0.weight", "bias": "conv0.bias", "bn_gamma": "bn1.weight", "bn_beta": "bn1.bias",
        "bn_mean": "bn1.running_mean", "bn_var": "bn1.running_var",
    }
    return {key: to(j.array(prefix + suffix)) for key, suffix in names.items()}


def cc_embeds(j: Joint, stage: str, to):
    prefix = f"kd/cc/{stage}/"
    return (
        to(_linear_weight(j, prefix + "embed/linear0.weight")), to(j.array(prefix + "embed/linear0.bias")),
        to(_linear_weight(j, prefix + "teacher_embed/linear0.weight")), to(j.array(prefix + "teacher_embed/linear0.bias")),
    )


def reference_terms(
    j: Joint, values: Dict[str, torch.Tensor], labels: torch.Tensor, bn_batch_stats: bool, dtype=torch.float64
) -> Dict[str, torch.Tensor]:
    """Every loss output of `j` computed by kd_reference from tap values.

    values: {tensor name in the joint graph: float64 tensor} for every tap (teacher ones as
    `teacher/<name>`) and `logits` (converted to `dtype`); connector parameters are the graph's
    initial initializers;
    bn_batch_stats: how the FitNet regressor's BN normalises (False: running statistics, as an
    InferenceSession; True: batch statistics, as ORT Training).
    """
    sc = j.sidecar
    hyper = sc["hyper"]
    to = lambda a: torch.from_numpy(np.array(a)).to(dtype)
    values = {k: v.to(dtype) for k, v in values.items()}
    student_out = ort_train.student_output_names(sc)[0]
    out = {"loss/ce": R.ce(values[student_out], labels)}

    def tensors(method):
        pairs = j.pairs(method)
        assert pairs, f"{method}: the sidecar lists no pairs"
        return [(values[p["student"]["tensor"]], values["teacher/" + p["teacher"]["tensor"]]) for p in pairs]

    def single(method):
        pairs = tensors(method)
        assert len(pairs) == 1, f"{method} uses one pair, the sidecar lists {len(pairs)}"
        return pairs[0], j.pairs(method)[0]["stage"]

    for m in sc["methods"]:
        if m == "kd":
            (s, t), _ = single(m)
            out["loss/kd"] = R.kd(s, t, float(hyper["temperature"]))
        elif m == "fitnet":
            (s, t), stage = single(m)
            out["loss/fitnet"] = R.fitnet(s, t, fitnet_regressor(j, stage, to), bn_batch_stats=bn_batch_stats)
        elif m == "at":
            out["loss/at"] = R.at(tensors(m))
        elif m == "sp":
            (s, t), _ = single(m)
            out["loss/sp"] = R.sp(s, t)
        elif m == "cc":
            (s, t), stage = single(m)
            out["loss/cc"] = R.cc(s, t, *cc_embeds(j, stage, to))
        elif m == "pkt":
            (s, t), _ = single(m)
            out["loss/pkt"] = R.pkt(s, t)
        elif m == "rkd":
            (s, t), _ = single(m)
            out["loss/rkd"] = R.rkd(s, t)[0]
        elif m == "nst":
            out["loss/nst"] = R.nst(tensors(m))
        else:
            raise NotImplementedError(m)
    if "loss/kd" not in out and hyper["alpha"] > 0:
        out["loss/kd"] = R.kd(values[student_out], values["teacher/" + student_out], float(hyper["temperature"]))

    total = hyper["gamma"] * out["loss/ce"]
    if "loss/kd" in out:
        total = total + hyper["alpha"] * out["loss/kd"]
    for m in sc["methods"]:
        if m != "kd":
            assert m in hyper["beta"], f"sidecar hyper.beta has no weight for {m}: {hyper['beta']}"
            total = total + hyper["beta"][m] * out[f"loss/{m}"]
    out["loss"] = total
    return out


def compare_terms(
    j: Joint,
    got: Dict[str, np.ndarray],
    want: Dict[str, torch.Tensor],
    rtol: float,
    atol: float,
    what: str,
    want32: Dict[str, torch.Tensor] | None = None,
):
    """Every loss output within atol + rtol * |reference| (+ the float32 floor, see below).

    want32: the same reference evaluated in float32 on the same inputs. |want32 - want| is what
    float32 rounding alone does to the documented formula on these inputs; FLOAT32_FLOOR times
    it is added to the tolerance, so that an intrinsically ill-conditioned term (KD between
    nearly uniform logits: T^2 * KL ~ 1e-2 from log-probabilities ~ -4.6) is not blamed on the
    graph. It is reported in the message either way.
    """
    assert set(j.loss_names) == set(want), f"{what}: loss outputs {j.loss_names}, reference terms {sorted(want)}"
    failures = []
    for name in j.loss_names:
        g, w = float(got[name]), float(want[name])
        floor = 0.0 if want32 is None else abs(float(want32[name]) - w)
        if not abs(g - w) <= atol + rtol * abs(w) + FLOAT32_FLOOR * floor:
            line = f"{name}: graph {g:.9g}, reference {w:.9g} (rel err {abs(g - w) / max(abs(w), 1e-30):.3g})"
            if want32 is not None:
                line += f"; the reference in float32 gives {float(want32[name]):.9g}"
            failures.append(line)
    assert not failures, f"{what} (rtol {rtol}, atol {atol}):\n  " + "\n  ".join(failures)


# --------------------------------------------------------------------------- 1. graph contract


@pytest.fixture(scope="module")
def kdgraph_version(kdgraph_bin):
    out = subprocess.run([str(kdgraph_bin), "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.split()[-1]


def _is_float(t: onnx.TensorProto) -> bool:
    return t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


CONTRACT_CASES = [[m] for m in METHODS] + [COMBO]


@pytest.mark.parametrize("methods", CONTRACT_CASES, ids=[method_id(c) for c in CONTRACT_CASES])
def test_graph_contract(joint, methods, kdgraph_version):
    j = joint(COMMITTED, methods)
    model, sc, g = j.model, j.sidecar, j.model.graph
    teacher_path, student_path = (fixture_path(*m) for m in PAIRS[COMMITTED])

    onnx.checker.check_model(str(j.path), full_check=True)

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert 13 <= opsets.get("ai.onnx", 0) <= 21, f"ai.onnx opset {opsets}"
    assert set(opsets) == {"ai.onnx"}, f"unexpected opset domains {opsets}"
    assert model.ir_version <= 10, f"IR version {model.ir_version}"

    init_names = set(j.inits)
    known = {i.name for i in g.input} | init_names | {""}
    for k, node in enumerate(g.node):
        missing = [x for x in node.input if x not in known]
        assert not missing, f"node {k} `{node.name}` ({node.op_type}) reads {missing} before they are produced"
        known.update(node.output)
    assert not init_names & {i.name for i in g.input}, "initializers listed as graph inputs"

    out0 = g.output[0]
    assert out0.name == "loss"
    assert out0.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out0.type.tensor_type.HasField("shape") and len(out0.type.tensor_type.shape.dim) == 0, "loss is not a scalar"
    expected = expected_output_order(sc)
    assert j.output_names == expected, f"graph outputs {j.output_names}, documented order {expected}"
    assert [o["name"] for o in sc["outputs"]] == j.output_names
    roles = {o["name"]: o["role"] for o in sc["outputs"]}
    assert roles["loss"] == "loss"
    assert all(roles[n] == "term" for n in j.output_names if n.startswith("loss/"))
    assert [i.name for i in g.input] == [i["name"] for i in sc["inputs"]] == ["input", "labels"]
    assert g.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [i["dtype"] for i in sc["inputs"]] == ["float32", "int64"]
    # The sidecar lists the methods as chosen, KD first (its term follows CE in the outputs).
    assert sc["methods"] == sorted(methods, key=lambda m: m != "kd")

    # Parameters: trainable and frozen ones are float initializers, disjoint, none of the teacher.
    req, frozen = sc["requires_grad"], sc["frozen_params"]
    assert len(set(req)) == len(req) and len(set(frozen)) == len(frozen), "duplicates in the parameter lists"
    assert not set(req) & set(frozen), f"both trainable and frozen: {sorted(set(req) & set(frozen))}"
    for name in req + frozen:
        assert name in j.inits, f"sidecar parameter `{name}` is not an initializer"
        assert _is_float(j.inits[name]), f"sidecar parameter `{name}` is not a float tensor"
        assert not name.startswith("teacher/"), f"teacher initializer `{name}` in requires_grad/frozen_params"

    # Names: teacher initializers renamed and bit-identical, student ones kept, added ones under kd/.
    teacher = {i.name: i for i in onnx.load(str(teacher_path)).graph.initializer}
    student_model = onnx.load(str(student_path))
    student = {i.name: i for i in student_model.graph.initializer}
    teacher_nodes = [n for n in g.node if n.name.startswith("teacher/")]
    assert teacher_nodes, "no node named teacher/..."
    for node in teacher_nodes:
        for x in list(node.input) + list(node.output):
            assert x == "" or x == "input" or x.startswith("teacher/"), f"teacher node `{node.name}` uses `{x}`"
    for name, init in j.inits.items():
        if name.startswith("teacher/"):
            orig = name[len("teacher/"):]
            assert orig in teacher, f"`{name}` is not an initializer of the teacher"
            assert np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(teacher[orig])), f"`{name}` changed"
        elif name in student:
            assert np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(student[name])), f"student `{name}` changed"
        else:
            # Added tensors live under kd/...; the constant weights of the total sit beside the
            # term outputs they scale (loss/<term>/weight), which DESIGN.md does not name.
            assert name.startswith("kd/") or (name.startswith("loss/") and name not in req + frozen), (
                f"initializer `{name}` is neither teacher/, a student name, kd/... nor a loss weight"
            )
    for name in req + frozen:
        if name not in student:
            assert any(name.startswith(f"kd/{m}/") for m in methods), f"added parameter `{name}` not under kd/<method>/"
    student_params = {n for n, i in student.items() if _is_float(i)}
    bn_stats = {x for n in g.node if n.op_type == "BatchNormalization" for x in n.input[3:5]}
    missing = sorted(n for n in (student_params - bn_stats) if n in init_names and n not in req)
    assert not missing, f"student parameters not in requires_grad: {missing}"
    assert bn_stats <= set(frozen), f"BN running statistics not frozen: {sorted(bn_stats - set(frozen))}"

    # BatchNormalization: inference form only, and none in the teacher (it runs in eval mode).
    for node in g.node:
        if node.op_type == "BatchNormalization":
            assert len(node.output) == 1, f"BN `{node.name}` has {len(node.output)} outputs"
            assert all(not (a.name == "training_mode" and a.i) for a in node.attribute), f"BN `{node.name}` in training mode"
            assert not node.name.startswith("teacher/"), f"teacher BN `{node.name}` not folded"

    # Tap shapes and pools.
    for p in sc["pairs"]:
        t_shape, s_shape = p["teacher"]["shape"], p["student"]["shape"]
        if len(t_shape) == 4:
            assert (p["pool"] is None) == (t_shape[2:] == s_shape[2:]), f"pool {p['pool']!r} for {t_shape} / {s_shape}"

    props = {p.key: p.value for p in model.metadata_props}
    version = [v for k, v in props.items() if "version" in k]
    assert version == [kdgraph_version], f"metadata_props {props}: no kdgraph version {kdgraph_version}"
    listed = [v for k, v in props.items() if "method" in k]
    assert len(listed) == 1 and re.split(r"[,\s]+", listed[0].strip()) == sc["methods"], f"metadata_props {props}"


# --------------------------------------------------------------------------- 2. fidelity


FIDELITY_CASES = [(pair, [m]) for pair in FIDELITY_PAIRS for m in METHODS] + [(COMMITTED, COMBO)]


@pytest.mark.parametrize(
    "pair, methods", FIDELITY_CASES, ids=[f"{p}-{method_id(m)}" for p, m in FIDELITY_CASES]
)
def test_fidelity(joint, pair, methods):
    """Every loss output of an InferenceSession equals kd_reference on the graph's own taps."""
    j = joint(pair, methods)
    x, y = image_batch(FIDELITY_BATCH), label_batch(FIDELITY_BATCH)
    got = run_with_taps(j.model, j.tap_names(), {"input": x, "labels": y})
    values = {name: torch.from_numpy(got[name]).double() for name in j.tap_names()}
    want = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False)
    want32 = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False, dtype=torch.float32)
    compare_terms(j, got, want, FID_RTOL, FID_ATOL, f"{pair} {method_id(methods)}, batch {FIDELITY_BATCH}", want32)


RKD_PAIRS = [COMMITTED] + FIDELITY_PAIRS


@pytest.mark.parametrize("pair", RKD_PAIRS)
def test_rkd_accurate_in_float32(joint, pair):
    """RKD on the models' real embeddings, to rtol 1e-4 of the float64 value (no float32 floor).

    The embeddings of a batch are close (pairwise distances 1e-6..1e-1 against norms 3..10 on
    these untrained models), so |e_i|^2 + |e_j|^2 - 2 e_i.e_j cancels catastrophically in
    float32 while the same distance computed from e_i - e_j does not; a float32 graph can
    reach this accuracy, and training depends on those distances.
    """
    j = joint(pair, "rkd")
    x, y = image_batch(FIDELITY_BATCH), label_batch(FIDELITY_BATCH)
    got = run_with_taps(j.model, j.tap_names(), {"input": x, "labels": y})
    values = {name: torch.from_numpy(got[name]).double() for name in j.tap_names()}
    want = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False)
    (s, t), = [(values[p["student"]["tensor"]], values["teacher/" + p["teacher"]["tensor"]]) for p in j.pairs("rkd")]
    dist = lambda e: torch.cdist(e, e)[~torch.eye(len(e), dtype=torch.bool)]
    detail = (f"student min distance {float(dist(s).min()):.3g} at norm {float(s.norm(dim=1).mean()):.3g}, "
              f"teacher min distance {float(dist(t).min()):.3g} at norm {float(t.norm(dim=1).mean()):.3g}")
    w, g = float(want["loss/rkd"]), float(got["loss/rkd"])
    assert abs(g - w) <= FID_RTOL * abs(w), f"{pair} rkd: graph {g:.9g}, float64 reference {w:.9g} ({detail})"


def loss_subgraph(j: Joint, cut: Sequence[str]) -> onnx.ModelProto:
    """The part of the joint graph that computes the loss outputs from the tensors `cut`.

    Fails if it reaches past the cut into the teacher or the student (then the sidecar's taps
    do not describe what the loss reads).
    """
    g = j.model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    student_values = {v for n in onnx.load(str(fixture_path(*PAIRS[j.pair][1]))).graph.node for v in n.output}
    keep, reached, stack = set(), set(), list(j.loss_names)
    while stack:
        t = stack.pop()
        if t in cut:
            reached.add(t)
            continue
        if t == "" or t in j.inits:
            continue
        if t in graph_inputs:  # e.g. the batch size through Shape(input): fed as a graph input
            reached.add(t)
            continue
        node = producer[t]
        if id(node) in keep:
            continue
        assert not node.name.startswith("teacher/") and not set(node.output) & student_values, (
            f"the loss reads `{t}` from the model (node `{node.name}`) beyond the sidecar's taps"
        )
        keep.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in g.node if id(n) in keep]
    used = {x for n in nodes for x in n.input}
    inputs = [i for i in g.input if i.name in reached] + [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in cut if n in reached and n not in graph_inputs
    ]
    outputs = [o for o in g.output if o.name in j.loss_names]
    graph = onnx.helper.make_graph(nodes, "loss", inputs, outputs, [i for n, i in j.inits.items() if n in used])
    return onnx.helper.make_model(graph, opset_imports=j.model.opset_import, ir_version=j.model.ir_version)


SYNTHETIC_BATCH = 5  # not the tract check's 4, and odd (CC pairs adjacent samples)


@pytest.mark.parametrize(
    "pair, methods", [(p, [m]) for p in [COMMITTED] + FIDELITY_PAIRS for m in METHODS],
    ids=[f"{p}-{m}" for p in [COMMITTED] + FIDELITY_PAIRS for m in METHODS],
)
def test_loss_terms_on_synthetic_taps(joint, pair, methods):
    """The loss subgraph alone, fed signed random taps: all terms are far from 0 and must match."""
    j = joint(pair, methods)
    rng = np.random.RandomState(7)
    shapes = {}
    for p in j.sidecar["pairs"]:
        shapes[p["student"]["tensor"]] = p["student"]["shape"]
        shapes["teacher/" + p["teacher"]["tensor"]] = p["teacher"]["shape"]
    shapes.setdefault("logits", ["N", NUM_CLASSES])
    feeds = {}
    for name, shape in shapes.items():
        dims = [SYNTHETIC_BATCH if isinstance(d, str) else int(d) for d in shape]
        scale = 3.0 if dims[-1] == NUM_CLASSES and len(dims) == 2 else 1.0
        feeds[name] = (scale * rng.standard_normal(dims)).astype(np.float32)
    feeds["labels"] = label_batch(SYNTHETIC_BATCH)
    feeds["input"] = np.zeros((SYNTHETIC_BATCH, *mf.INPUT_SHAPE), np.float32)  # read only for its shape, if at all
    model = loss_subgraph(j, list(feeds))
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    used = {i.name for i in session.get_inputs()}
    got = dict(zip(j.loss_names, session.run(j.loss_names, {k: v for k, v in feeds.items() if k in used})))
    values = {k: torch.from_numpy(v).double() for k, v in feeds.items() if k not in ("labels", "input")}
    want = reference_terms(j, values, torch.from_numpy(feeds["labels"]), bn_batch_stats=False)
    compare_terms(j, got, want, FID_RTOL, 0.0, f"{pair} {method_id(methods)} on synthetic taps, batch {SYNTHETIC_BATCH}")


# --------------------------------------------------------------------------- 3. ORT Training


def teacher_initializers(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("teacher/")}


@pytest.mark.parametrize("method", METHODS)
def test_ort_training(joint, artifacts, method, tmp_path):
    j = joint(COMMITTED, method)
    paths = artifacts(j)
    session = ort_train.TrainingSession(paths, lr=LR, sidecar=j.sidecar)
    feeds = {"input": image_batch(TRAIN_BATCH), "labels": label_batch(TRAIN_BATCH)}
    conv = first_student_conv_weight(j)
    before = session.parameter(conv)

    losses = session.train_steps(feeds, TRAIN_STEPS)
    final = float(session.forward_backward(feeds)["loss"])
    assert np.all(np.isfinite(losses)) and np.isfinite(final), f"{method}: non-finite loss {losses} / {final}"
    assert final < losses[0], f"{method}: loss did not fall in {TRAIN_STEPS} steps: {losses[0]} -> {final} ({losses})"
    assert not np.array_equal(session.parameter(conv), before), f"{method}: `{conv}` did not change"

    # The teacher: constant initializers of the training and eval models, bit-identical to the
    # joint graph's, and never a checkpoint parameter. ORT may fold teacher Constant nodes into
    # new initializers (teacher//Constant_1_output_0): those compare with the Constant's value.
    joint_teacher = teacher_initializers(j.model)
    joint_constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in j.model.graph.node
        if n.op_type == "Constant" and n.name.startswith("teacher/") and n.attribute[0].name == "value"
    }
    for which in (paths.training_model, paths.eval_model):
        m = onnx.load(str(which))
        assert not [i.name for i in m.graph.input if i.name.startswith("teacher/")], f"{which.name}: teacher weights as inputs"
        got = teacher_initializers(m)
        if which == paths.training_model:
            lost = sorted(set(joint_teacher) - set(got))
            assert not lost, f"{method}: teacher initializers missing from the training model: {lost[:5]}"
        for name, arr in got.items():
            ref = joint_teacher.get(name, joint_constants.get(name))
            if ref is None:
                continue  # made by ORT from something else (e.g. a shape computation)
            assert np.array_equal(arr, ref), f"{method} {which.name}: teacher tensor `{name}` differs from joint.onnx"
    # The trained checkpoint, saved and read back: teacher tensors are not parameters (frozen
    # ones would be; then they must still equal the joint graph's).
    reloaded = session.save_checkpoint(tmp_path / "trained.ckpt")
    for name, param in reloaded.parameters:
        if name.startswith("teacher/"):
            assert np.array_equal(np.array(param.data), joint_teacher[name]), f"{method}: checkpoint `{name}` changed"
            assert not param.requires_grad, f"{method}: teacher `{name}` is trainable"

    # The exported student reproduces the eval-mode module.
    student_outputs = ort_train.student_output_names(j.sidecar)
    eval_out = session.evaluate(feeds)
    exported = session.export_student(tmp_path / "student.onnx", student_outputs)
    m = onnx.load(str(exported))
    assert [i.name for i in m.graph.input] == ["input"], f"exported student inputs {[i.name for i in m.graph.input]}"
    assert not [i.name for i in m.graph.initializer if i.name.startswith(("teacher/", "kd/"))], "teacher or kd tensors in the student"
    sess = ort.InferenceSession(str(exported), session_options(), providers=["CPUExecutionProvider"])
    logits = sess.run(student_outputs, {"input": feeds["input"]})[0]
    np.testing.assert_allclose(logits, eval_out[student_outputs[0]], rtol=EXPORT_TOL, atol=EXPORT_TOL,
                               err_msg=f"{method}: exported student vs eval-mode module")
    assert np.array_equal(numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == conv)),
                          session.parameter(conv)), f"{method}: exported `{conv}` is not the trained one"


# --------------------------------------------------------------------------- 4. gradients


def first_student_conv_weight(j: Joint) -> str:
    node = next(n for n in j.model.graph.node if n.op_type == "Conv" and not n.name.startswith("teacher/"))
    return node.input[1]


_FROZEN_FEATS: Dict[tuple, tuple] = {}


def _frozen_feats(name: str, seed: int, x: np.ndarray):
    """(feats, logits) of build(name).eval() in float64 without gradient, cached per batch seed."""
    key = (name, seed)
    if key not in _FROZEN_FEATS:
        model = mf.build(name).double().eval()
        with torch.no_grad():
            _FROZEN_FEATS[key] = model(torch.from_numpy(x).double(), is_feat=True)
    return _FROZEN_FEATS[key]


def torch_taps(j: Joint, x: np.ndarray, seed: int, train: bool):
    """({joint tensor name: float64 tensor} for every tap from the PyTorch models, the student).

    Student: build(name) in train mode (batch statistics, as ORT trains; with autograd) when
    `train`, else eval (no gradient, cached); teacher: build(name).eval(). Taps are mapped by
    the sidecar's stage names (stageK -> feats[K], embedding -> feats[-1], logits -> logits).
    """
    (t_name, _), (s_name, _) = PAIRS[j.pair]
    t_feats, t_logits = _frozen_feats(t_name, seed, x)
    if train:
        student = mf.build(s_name).double().train()
        s_feats, s_logits = student(torch.from_numpy(x).double(), is_feat=True)
    else:
        student = None
        s_feats, s_logits = _frozen_feats(s_name, seed, x)

    def pick(feats, logits, stage):
        if stage == "logits":
            return logits
        if stage == "embedding":
            return feats[-1]
        m = re.fullmatch(r"stage(\d+)", stage)
        assert m, f"unknown stage name {stage!r}"
        return feats[int(m.group(1))]

    values = {ort_train.student_output_names(j.sidecar)[0]: s_logits}
    for p in j.sidecar["pairs"]:
        values[p["student"]["tensor"]] = pick(s_feats, s_logits, p["stage"])
        values["teacher/" + p["teacher"]["tensor"]] = pick(t_feats, t_logits, p["stage"])
    return values, student


GRAD_CASES = [(m, w) for m in METHODS for w in ("default", "gamma0")]


@pytest.mark.parametrize("method, weights", GRAD_CASES, ids=[f"{m}-{w}" for m, w in GRAD_CASES])
def test_gradient_matches_torch(joint, artifacts, method, weights):
    """ORT Training's gradient of the first student conv weight vs torch autograd.

    default: the merged loss as is; gamma0: `--gamma 0`, the method's own term alone (CE would
    otherwise dominate the gradient of small terms such as SP or PKT).
    """
    extra = () if weights == "default" else ("--gamma", "0")
    j = joint(COMMITTED, method, *extra)
    seed = 3
    x, y = image_batch(TRAIN_BATCH, seed), label_batch(TRAIN_BATCH, seed)

    # The stage -> feats mapping is right: eval-mode torch taps equal the graph's.
    want_eval, _ = torch_taps(j, x, seed, train=False)
    got_eval = run_with_taps(j.model, list(want_eval), {"input": x, "labels": y})
    for name, v in want_eval.items():
        np.testing.assert_allclose(got_eval[name], v.detach().numpy(), rtol=1e-3, atol=1e-3,
                                   err_msg=f"tap `{name}` is not the torch feat its stage names")

    session = ort_train.TrainingSession(artifacts(j), sidecar=j.sidecar)
    conv = first_student_conv_weight(j)
    outputs = session.forward_backward({"input": x, "labels": y})
    got = session.gradient(conv)
    assert got is not None, f"no gradient for `{conv}`"

    values, student = torch_taps(j, x, seed, train=True)
    terms = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=True)
    # The forward values agree too (batch-statistics BN on both sides). The taps themselves come
    # from different float32 / float64 networks here, hence rtol 1e-3 (as test_fixture_taps'
    # train tolerance), plus the float32 floor of the formula (see compare_terms).
    detached = {k: v.detach() for k, v in values.items()}
    terms32 = reference_terms(j, detached, torch.from_numpy(y), bn_batch_stats=True, dtype=torch.float32)
    compare_terms(j, outputs, {k: v.detach() for k, v in terms.items()}, 1e-3, 1e-7,
                  f"{method} {weights}: training forward vs torch", terms32)
    params = dict(student.named_parameters())
    assert conv in params, f"`{conv}` is not a parameter of the torch student ({list(params)[:5]}...)"
    (want,) = torch.autograd.grad(terms["loss"], params[conv])
    want = want.numpy()
    assert got.shape == want.shape
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert np.linalg.norm(want) > 0, "zero reference gradient"
    assert rel < GRAD_RTOL, (
        f"{method} {weights}: gradient of `{conv}` rel err {rel:.3g} (|ort| {np.linalg.norm(got):.6g}, "
        f"|torch| {np.linalg.norm(want):.6g})"
    )


# --------------------------------------------------------------------------- 5. degenerate batches


@pytest.mark.parametrize("method", ["rkd", "sp", "cc"])
def test_batch_of_one(joint, method):
    """kdgraph documents RKD, SP and CC as 0 at batch 1; every loss output must be finite."""
    j = joint(COMMITTED, method)
    got = run_with_taps(j.model, [], {"input": image_batch(1), "labels": label_batch(1)})
    bad = {n: float(got[n]) for n in j.loss_names if not np.isfinite(got[n])}
    assert not bad, f"{method} at batch 1: non-finite {bad}"
    assert float(got[f"loss/{method}"]) == 0.0, f"{method} at batch 1: term {float(got[f'loss/{method}'])}, documented 0"


@pytest.mark.parametrize("method", ["rkd", "sp", "cc"])
def test_batch_of_one_gradients(joint, artifacts, method):
    """ORT Training at batch 1: the loss and every trainable parameter's gradient are finite."""
    j = joint(COMMITTED, method)
    session = ort_train.TrainingSession(artifacts(j), sidecar=j.sidecar)
    assert_finite_step(session, {"input": image_batch(1), "labels": label_batch(1)}, f"{method} batch 1")


def assert_finite_step(session: ort_train.TrainingSession, feeds, what: str):
    outputs = session.forward_backward(feeds)
    bad = {n: float(v) for n, v in outputs.items() if n.startswith("loss") and not np.isfinite(v)}
    assert not bad, f"{what}: non-finite training outputs {bad}"
    names = session.parameter_names(trainable_only=True)
    grads = {n: session.gradient(n) for n in names}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"{what}: no gradient for {missing[:5]}"
    bad = [n for n, g in grads.items() if not np.all(np.isfinite(g))]
    assert not bad, f"{what}: non-finite gradients of {len(bad)} parameters, e.g. {bad[:5]}"
    session.optimizer.step()
    bad = [n for n in names if not np.all(np.isfinite(session.parameter(n)))]
    assert not bad, f"{what}: non-finite parameters after the step, e.g. {bad[:5]}"


@pytest.mark.parametrize("method", METHODS)
def test_zero_images(joint, artifacts, method):
    """All-zero images: finite loss terms in an InferenceSession, finite gradients in ORT Training."""
    j = joint(COMMITTED, method)
    feeds = {"input": np.zeros((FIDELITY_BATCH, *mf.INPUT_SHAPE), np.float32), "labels": label_batch(FIDELITY_BATCH)}
    got = run_with_taps(j.model, [], feeds)
    bad = {n: float(got[n]) for n in j.loss_names if not np.isfinite(got[n])}
    assert not bad, f"{method} on zero images: non-finite {bad}"
    assert_finite_step(ort_train.TrainingSession(artifacts(j), sidecar=j.sidecar), feeds, f"{method} on zero images")
