"""Helpers shared by the merge suites: joint graphs, onnxruntime runs, reference comparison, contract and training checks."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

import kd_reference as R
import train_ort
from conftest import fixture_path, mf

ort.set_default_logger_severity(3)  # generate_artifacts and the training session log at INFO

# (teacher (name, export mode), student (name, export mode)) by readable id.
PAIRS = {
    "resnet56-resnet20": (("resnet56", "eval"), ("resnet20", "train")),  # the committed pair
    "resnet32x4-resnet8x4": (("resnet32x4", "eval"), ("resnet8x4", "train")),
    "vgg13_bn-mobile_half": (("vgg13_bn", "eval"), ("mobile_half", "train")),
    # Equal sizes, four times the channels in the student: AB's conv1x1 + BN connectors.
    "resnet56-resnet8x4": (("resnet56", "eval"), ("resnet8x4", "train")),
    # Stage ends at twice the student's size: pools (VID, FT) and AB's upsampling connector.
    "wrn_40_2-ShuffleV2": (("wrn_40_2", "eval"), ("ShuffleV2", "train")),
    # A teacher exported in training mode: its BatchNorms are in the file (OFD reads their margins).
    "resnet56train-resnet20": (("resnet56", "train"), ("resnet20", "train")),
    # Plain nets whose taps differ in size (test_merge_resizing): every FitNet regressor and every
    # pooling path. Stage sizes after the 32x32 stem: 16-8-4, 24-16-8, 16-12-6.
    "plain_16_8_4-plain_24_16_8": (("plain_16_8_4", "eval"), ("plain_24_16_8", "train")),
    "plain_24_16_8-plain_16_8_4": (("plain_24_16_8", "eval"), ("plain_16_8_4", "train")),
    "plain_16_8_4-plain_16_12_6": (("plain_16_8_4", "eval"), ("plain_16_12_6", "train")),
}
COMMITTED = "resnet56-resnet20"
FIDELITY_PAIRS = ["resnet32x4-resnet8x4", "vgg13_bn-mobile_half"]

NUM_CLASSES = mf.NUM_CLASSES
FIDELITY_BATCH = 4
TRAIN_BATCH = 8
TRAIN_STEPS = 15
LR = 1e-3

# Fidelity: float32 graph vs float64 reference on the same float32 tap values, rtol 1e-4, plus
# the float32 floor of an ill-conditioned formula (compare_terms). A term that float32 cannot
# reach at all (the reference evaluated in float32 misses rtol: PKT on real taps, ~1e-10, built
# from cosines ~1) is compared in float64 instead: the graph's own loss subgraph converted to
# float64 (float64_terms) vs the float64 reference, rtol FID_RTOL64 (measured: <= 1e-8), plus
# FLOAT64_ATOL, float64 rounding of O(1) ingredients, which only matters for a term that is zero
# to float64 precision (vgg13_bn -> mobile_half's PKT: the student's embeddings agree to 1e-14 in
# cosine, the term is ~1e-17 in any evaluation).
FID_RTOL = 1e-4
FLOAT32_FLOOR = 4.0
FID_RTOL64 = 1e-6
FLOAT64_ATOL = 1e-15
GRAD_RTOL = 1e-3
EXPORT_TOL = 1e-5

# Methods whose taps are taken before the stage's final ReLU (RepDistiller's preact=True).
PREACT_METHODS = {"ab", "ofd"}


def method_id(methods: Sequence[str]) -> str:
    return "+".join(methods)


# --------------------------------------------------------------------------- joint graphs


@dataclass
class Joint:
    """One merged graph (a main or an init stage): its path, sidecar, and lazily its proto."""

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
    def stage_name(self) -> str:
        return self.sidecar["stage"]

    @property
    def output_names(self) -> List[str]:
        return [o.name for o in self.model.graph.output]

    @property
    def input_names(self) -> List[str]:
        return [i.name for i in self.model.graph.input]

    @property
    def loss_names(self) -> List[str]:
        return train_ort.loss_outputs(self.sidecar)

    @property
    def student_outputs(self) -> List[str]:
        return train_ort.student_outputs(self.sidecar)

    def stage(self, name: str) -> "Joint":
        """The graph of the sidecar's stage `name` (itself for its own stage)."""
        if name == self.stage_name:
            return self
        spec = next((s for s in self.sidecar["stages"] if s["name"] == name), None)
        assert spec is not None, f"{self.path}: no stage {name!r} in {self.sidecar['stages']}"
        path = self.path.parent / spec["model"]
        return Joint(path, self.pair, self.methods, train_ort.read_sidecar(path))

    def pairs(self, method: str) -> List[dict]:
        return [p for p in self.sidecar["pairs"] if p["method"] == method]

    def tap_names(self) -> List[str]:
        """Every tap tensor of the pairs (teacher ones as `teacher/<name>`), plus the student outputs."""
        names = []
        for p in self.sidecar["pairs"]:
            for name in (p["student"]["tensor"], "teacher/" + p["teacher"]["tensor"]):
                if name not in names:
                    names.append(name)
        for name in self.student_outputs:
            if name not in names:
                names.append(name)
        return names


def joint_factory(merge: Callable[..., Path]) -> Callable[..., Joint]:
    """joint(pair_id, methods, *extra_args) -> Joint of the main graph, merged once per session."""
    cache: Dict[tuple, Joint] = {}

    def get(pair: str, methods, *extra: str) -> Joint:
        methods = tuple([methods] if isinstance(methods, str) else methods)
        key = (pair, methods, extra)
        if key not in cache:
            teacher, student = PAIRS[pair]
            path = merge(teacher, student, list(methods), *extra)
            cache[key] = Joint(path, pair, methods, train_ort.read_sidecar(path))
        return cache[key]

    return get


def artifacts_factory(tmp_path_factory) -> Callable[[Joint], Path]:
    """artifacts(joint) -> the folder of its ORT Training artifacts (train_ort.generate), once per graph.

    The training and eval models return every graph output: the loss, the terms, the student's
    outputs (the logits, to compare the eval-mode module with the exported student) and state.
    """
    cache: Dict[Path, Path] = {}

    def get(j: Joint) -> Path:
        if j.path not in cache:
            out = tmp_path_factory.mktemp(f"artifacts-{j.pair}-{method_id(j.methods)}-{j.stage_name}")
            cache[j.path] = train_ort.generate(j.sidecar, out)
        return cache[j.path]

    return get


def new_stage(j: Joint, workdir: Path, lr: float = LR) -> train_ort.Stage:
    """A fresh ORT Training module and optimizer over already generated artifacts."""
    return train_ort.Stage(j.sidecar, workdir, lr=lr, generated=True)


# --------------------------------------------------------------------------- CRD and feeds

# CRD with a small memory (N = 64 samples) and K = 16 negatives.
CRD_N, CRD_K = 64, 16
CRD_ARGS = ("--crd-n-data", str(CRD_N), "--crd-negatives", str(CRD_K))


def merge_args(method: str) -> Tuple[str, ...]:
    return CRD_ARGS if method == "crd" else ()


def crd_feeds(j: Joint, batch: int, seed: int = 0, z=(-1.0, -1.0)) -> Dict[str, np.ndarray]:
    """CRD's state inputs: dataset indices, contrast indices (column 0 the sample, then K distinct
    other samples), RepDistiller-initialised memories and Z (negative: estimate from this batch)."""
    hyper = j.sidecar["hyper"]["crd"]
    n, k = hyper["n_data"], hyper["negatives"]
    rng = np.random.RandomState(seed + 500)
    index = rng.choice(n, batch, replace=False)
    contrast = np.stack([np.concatenate([[i], rng.choice(np.delete(np.arange(n), i), k, replace=False)]) for i in index])
    generator = torch.Generator().manual_seed(seed)
    return {
        "kd/crd/index": index.astype(np.int64),
        "kd/crd/contrast_index": contrast.astype(np.int64),
        "kd/crd/memory_student": R.crd_init_memory(n, hyper["feat_dim"], generator, torch.float32).numpy(),
        "kd/crd/memory_teacher": R.crd_init_memory(n, hyper["feat_dim"], generator, torch.float32).numpy(),
        "kd/crd/z": np.asarray(z, np.float32),
    }


def graph_feeds(j: Joint, batch: int, seed: int = 0, images: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Every input of the stage graph `j`: images, labels (main stage), CRD state."""
    feeds = {"input": image_batch(batch, seed) if images is None else images}
    if j.stage_name == "main":
        feeds["labels"] = label_batch(batch, seed)
    if "crd" in j.methods:
        feeds.update(crd_feeds(j, batch, seed))
    return feeds


# --------------------------------------------------------------------------- onnxruntime


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return so


def run_with_taps(model: onnx.ModelProto, names: Sequence[str], feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Runs `model` in onnxruntime with `names` added as graph outputs; {name: array} of all outputs.

    Feeds that the graph does not take (labels for an init stage) are left out.
    """
    model = copy.deepcopy(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    taken = {i.name for i in session.get_inputs()}
    return dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in taken})))


def image_batch(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((batch, *mf.INPUT_SHAPE)).astype(np.float32)


def label_batch(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed + 1000).randint(0, NUM_CLASSES, size=batch).astype(np.int64)


# --------------------------------------------------------------------------- reference comparison


def compare_terms(
    j: Joint,
    got: Dict[str, np.ndarray],
    want: Dict[str, torch.Tensor],
    rtol: float,
    atol: float,
    what: str,
    want32: Dict[str, torch.Tensor] | None = None,
    float64: Callable[[List[str]], Dict[str, float]] | None = None,
):
    """Every loss output within atol + rtol * |reference| (+ the float32 floor, see below).

    want32: the same reference evaluated in float32 on the same inputs. |want32 - want| is what
    float32 rounding alone does to the documented formula on these inputs; FLOAT32_FLOOR times
    it is added to the tolerance, so that an intrinsically ill-conditioned term (KD between
    nearly uniform logits: T^2 * KL ~ 1e-2 from log-probabilities ~ -4.6) is not blamed on the
    graph. It is reported in the message either way.

    float64: float64(names) -> {name: value of the graph's formula evaluated in float64} (see
    float64_terms). Where it is given, a term that float32 cannot reach (|want32 - want| >
    rtol * |want|: no float32 evaluation of the formula is within rtol) is compared in float64,
    relative (FID_RTOL64, + FLOAT64_ATOL), instead of in float32; its float32 value must be
    finite, and it still enters the total `loss`, which is compared in float32 as usual.
    """
    assert set(j.loss_names) == set(want), f"{what}: loss outputs {j.loss_names}, reference terms {sorted(want)}"
    failures, in_float64 = [], []
    for name in j.loss_names:
        g, w = float(got[name]), float(want[name])
        floor = 0.0 if want32 is None else abs(float(want32[name]) - w)
        if float64 is not None and want32 is not None and floor > rtol * abs(w):
            assert np.isfinite(g), f"{what}: {name} is {g}"
            in_float64.append(name)
            continue
        if not abs(g - w) <= atol + rtol * abs(w) + FLOAT32_FLOOR * floor:
            line = f"{name}: graph {g:.9g}, reference {w:.9g} (rel err {abs(g - w) / max(abs(w), 1e-30):.3g})"
            if want32 is not None:
                line += f"; the reference in float32 gives {float(want32[name]):.9g}"
            failures.append(line)
    if in_float64:
        got64 = float64(in_float64)
        for name in in_float64:
            g, w = float(got64[name]), float(want[name])
            if not abs(g - w) <= FID_RTOL64 * abs(w) + FLOAT64_ATOL:
                failures.append(
                    f"{name} (beyond float32: the reference in float32 gives {float(want32[name]):.9g}, the graph "
                    f"{float(got[name]):.9g}): the graph in float64 {g:.12g}, reference {w:.12g} "
                    f"(rel err {abs(g - w) / max(abs(w), 1e-300):.3g}, rtol {FID_RTOL64}, atol {FLOAT64_ATOL})"
                )
    assert not failures, f"{what} (rtol {rtol}, atol {atol}):\n  " + "\n  ".join(failures)


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` that computes in float64: float32 initializers, Constant values, Cast
    targets, graph inputs and outputs made float64 (the same formula and the same constants)."""
    model = copy.deepcopy(model)
    g = model.graph
    f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    for init in g.initializer:
        if init.data_type == f32:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif node.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f64
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == f32:
            vi.type.tensor_type.elem_type = f64
    del g.value_info[:]
    return model


def float64_terms(j: Joint, values: Dict[str, np.ndarray]) -> Callable[[List[str]], Dict[str, float]]:
    """float64(names) -> the loss outputs `names` of `j`'s loss subgraph (cut at the tensors of
    `values`: taps and graph inputs) run in float64 on `values`, for compare_terms."""

    def run(names: List[str]) -> Dict[str, float]:
        model = as_float64(loss_subgraph(j, list(values), names))
        so = session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fused MatMuls have no float64 kernel
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in session.get_inputs():
            v = np.asarray(values[i.name])
            feeds[i.name] = v.astype(np.float64) if i.type == "tensor(double)" else v
        return {n: float(v) for n, v in zip(names, session.run(names, feeds))}

    return run


def total_loss(j: Joint, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """gamma * CE + alpha * KD + sum beta_m * L_m over the terms the graph outputs."""
    hyper = j.sidecar["hyper"]
    total = 0.0
    for name in j.loss_names:
        if name == "loss":
            continue
        term = name.split("/", 1)[1]
        weight = {"ce": hyper["gamma"], "kd": hyper["alpha"]}.get(term)
        if weight is None:
            assert term in hyper["beta"], f"sidecar hyper.beta has no weight for {term}: {hyper['beta']}"
            weight = hyper["beta"][term]
        total = total + weight * terms[name]
    return total


def linear_weight(j: Joint, name: str) -> np.ndarray:
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


def loss_subgraph(j: Joint, cut: Sequence[str], outputs: Optional[Sequence[str]] = None) -> onnx.ModelProto:
    """The part of the joint graph that computes the loss outputs (or `outputs` of them) from the
    tensors `cut`.

    Fails if it reaches past the cut into the teacher or the student (then the sidecar's taps
    do not describe what the loss reads).
    """
    outputs = list(j.loss_names if outputs is None else outputs)
    g = j.model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    student_values = {v for n in onnx.load(str(fixture_path(*PAIRS[j.pair][1]))).graph.node for v in n.output}
    keep, reached, stack = set(), set(), list(outputs)
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
    graph_outputs = [o for o in g.output if o.name in outputs]
    graph = onnx.helper.make_graph(nodes, "loss", inputs, graph_outputs, [i for n, i in j.inits.items() if n in used])
    return onnx.helper.make_model(graph, opset_imports=j.model.opset_import, ir_version=j.model.ir_version)


# --------------------------------------------------------------------------- graph contract


def is_float(t: onnx.TensorProto) -> bool:
    return t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def reaching(j: Joint, outputs: Sequence[str]) -> set:
    """Every tensor name (initializers included) that some of `outputs` depends on."""
    producer = {o: n for n in j.model.graph.node for o in n.output}
    seen, stack = set(), list(outputs)
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in producer:
            stack.extend(producer[t].input)
    return seen


# Ops that ORT Training 1.19 cannot differentiate, or whose CPU gradient is missing or broken
# (RUNTIMES.md): none may sit between a trainable parameter and the loss.
NO_CPU_GRADIENT = {
    "Softplus", "Einsum", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL1", "ReduceProd", "ReduceLogSum",
    "Sum", "Mean", "NegativeLogLikelihoodLoss", "Sign", "Floor", "Round", "Elu", "Selu", "HardSigmoid", "HardSwish",
    "PRelu", "CumSum", "InstanceNormalization", "GroupNormalization", "ConvTranspose", "Resize", "AveragePool",
}


# The field that holds an attribute's value, by attribute type (repeated types may be empty).
_ATTRIBUTE_FIELD = {
    onnx.AttributeProto.INT: "i", onnx.AttributeProto.FLOAT: "f", onnx.AttributeProto.STRING: "s",
    onnx.AttributeProto.TENSOR: "t", onnx.AttributeProto.GRAPH: "g",
}


def attributes_without_value(model: onnx.ModelProto) -> List[str]:
    """`op node.attribute (TYPE)` for every attribute whose value field is absent from the file.

    onnx.proto is proto2: an INT attribute must carry its `i` even when it is 0. A writer with
    proto3 habits leaves zeros out (keepdims=0, axis=0, Gemm beta=0.0); onnx.checker and tract
    read the absent field as 0, but ORT does not: its gradient builders check has_i() (Split's
    gradient fails on axis) or fall back to the schema default (ReduceMean_Grad reads keepdims=1
    and its Expand fails)."""
    missing = []
    for node in model.graph.node:
        for a in node.attribute:
            value_field = _ATTRIBUTE_FIELD.get(a.type)
            if value_field and not a.HasField(value_field):
                missing.append(f"{node.op_type} `{node.name}`.{a.name} ({onnx.AttributeProto.AttributeType.Name(a.type)})")
    return missing


def says_rewritten(line: str, op: str) -> bool:
    """Whether a note says that `op` was rewritten: `op` after the word "rewrote" (the part
    before names the file, which may contain the op's name)."""
    _, rewrote, what = line.partition("rewrote")
    return bool(rewrote) and op in what


def gradient_path(j: Joint) -> List[onnx.NodeProto]:
    """The nodes that read (transitively) a requires_grad parameter and that the loss depends on."""
    tainted = set(j.sidecar["requires_grad"])
    reached = reaching(j, ["loss"])
    path = []
    for node in j.model.graph.node:
        if tainted & set(node.input):
            tainted.update(node.output)
            if set(node.output) & reached:
                path.append(node)
    return path


def folded_teacher_constants(teacher: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """What folding each BatchNormalization of the teacher file into constants gives, by the names
    kdgraph writes (before the teacher/ prefix): `<BN output>.scale` and `.shift` (BN as Mul + Add),
    `<BN output>.folded_bias` and `.folded_weight` (BN folded into the Conv before it:
    (conv bias - mean) * scale + beta, conv weight * scale per output channel)."""
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in teacher.graph.initializer}
    producer = {o: n for n in teacher.graph.node for o in n.output}
    out = {}
    for node in teacher.graph.node:
        if node.op_type != "BatchNormalization" or not all(x in inits for x in node.input[1:5]):
            continue
        gamma, beta, mean, var = (inits[x] for x in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        conv = producer.get(node.input[0])
        conv_bias = inits.get(conv.input[2], 0.0) if conv is not None and conv.op_type == "Conv" and len(conv.input) > 2 else 0.0
        base = node.output[0]
        out[f"{base}.scale"] = scale
        out[f"{base}.shift"] = beta - mean * scale
        out[f"{base}.folded_bias"] = (conv_bias - mean) * scale + beta
        if conv is not None and conv.op_type == "Conv" and conv.input[1] in inits:
            out[f"{base}.folded_weight"] = (inits[conv.input[1]] * scale.reshape(-1, 1, 1, 1)).reshape(-1)
    return out


def check_graph_contract(
    j: Joint,
    kdgraph_version: str,
    expected_outputs: Sequence[str],
    expected_inputs: Sequence[Tuple[str, str]],
    needs_teacher: bool = True,
):
    """DESIGN.md / RUNTIMES.md rules that every written graph (main or init stage) must keep.

    expected_outputs: the graph outputs in order; expected_inputs: [(name, sidecar dtype)] in order;
    needs_teacher: whether the loss reads the teacher (False: no teacher node may be left in the graph).
    """
    model, sc, g = j.model, j.sidecar, j.model.graph
    teacher_path, student_path = (fixture_path(*m) for m in PAIRS[j.pair])
    methods = j.methods
    where = f"{j.path.name} ({method_id(methods)}, {j.stage_name})"

    onnx.checker.check_model(str(j.path), full_check=True)

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert 13 <= opsets.get("ai.onnx", 0) <= 21, f"{where}: ai.onnx opset {opsets}"
    assert set(opsets) == {"ai.onnx"}, f"{where}: unexpected opset domains {opsets}"
    assert model.ir_version <= 10, f"{where}: IR version {model.ir_version}"

    init_names = set(j.inits)
    known = {i.name for i in g.input} | init_names | {""}
    for k, node in enumerate(g.node):
        missing = [x for x in node.input if x not in known]
        assert not missing, f"{where}: node {k} `{node.name}` ({node.op_type}) reads {missing} before they are produced"
        known.update(node.output)
    assert not init_names & {i.name for i in g.input}, f"{where}: initializers listed as graph inputs"

    out0 = g.output[0]
    assert out0.name == "loss", f"{where}: output 0 is `{out0.name}`"
    assert out0.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out0.type.tensor_type.HasField("shape") and len(out0.type.tensor_type.shape.dim) == 0, f"{where}: loss is not a scalar"
    assert j.output_names == list(expected_outputs), f"{where}: graph outputs {j.output_names}, documented order {list(expected_outputs)}"
    assert [o["name"] for o in sc["outputs"]] == j.output_names, f"{where}: sidecar outputs {sc['outputs']}"
    roles = {o["name"]: o["role"] for o in sc["outputs"]}
    assert roles["loss"] == "loss"
    assert all(roles[n] == "term" for n in j.output_names if n.startswith("loss/")), f"{where}: roles {roles}"
    expected_names = [n for n, _ in expected_inputs]
    assert j.input_names == [i["name"] for i in sc["inputs"]] == expected_names, (
        f"{where}: graph inputs {j.input_names}, sidecar {[i['name'] for i in sc['inputs']]}, expected {expected_names}"
    )
    assert [i["dtype"] for i in sc["inputs"]] == [d for _, d in expected_inputs], f"{where}: input dtypes {sc['inputs']}"
    onnx_dtypes = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    for i, (_, dtype) in zip(g.input, expected_inputs):
        assert i.type.tensor_type.elem_type == onnx_dtypes[dtype], f"{where}: input `{i.name}` is not {dtype}"
    # The sidecar lists the methods as chosen, KD first (its term follows CE in the outputs);
    # --alpha > 0 adds KD.
    chosen = list(methods) + (["kd"] if sc["hyper"]["alpha"] > 0 and "kd" not in methods else [])
    assert sc["methods"] == sorted(chosen, key=lambda m: m != "kd"), f"{where}: sidecar methods {sc['methods']}"

    # Parameters: trainable and frozen ones are float initializers, disjoint, none of the teacher;
    # every trainable one reaches the loss.
    req, frozen = sc["requires_grad"], sc["frozen_params"]
    assert len(set(req)) == len(req) and len(set(frozen)) == len(frozen), f"{where}: duplicates in the parameter lists"
    assert not set(req) & set(frozen), f"{where}: both trainable and frozen: {sorted(set(req) & set(frozen))}"
    for name in req + frozen:
        assert name in j.inits, f"{where}: sidecar parameter `{name}` is not an initializer"
        assert is_float(j.inits[name]), f"{where}: sidecar parameter `{name}` is not a float tensor"
        assert not name.startswith("teacher/"), f"{where}: teacher initializer `{name}` in requires_grad/frozen_params"
    reached = reaching(j, ["loss"])
    unreached = [n for n in req if n not in reached]
    assert not unreached, f"{where}: requires_grad parameters that do not reach the loss: {unreached[:5]}"
    bad = sorted({f"{n.op_type} `{n.name}`" for n in gradient_path(j) if n.op_type in NO_CPU_GRADIENT})
    assert not bad, f"{where}: ops without a (CPU) gradient in ORT Training 1.19 between a parameter and the loss: {bad[:5]}"

    # Names: teacher initializers renamed and bit-identical, student ones kept, added ones under kd/.
    def constants(graph):
        # kdgraph makes a Constant node's value an initializer of the node's output name.
        named = {i.name: i for i in graph.initializer}
        named.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute[0].name == "value"})
        return named

    teacher = constants(onnx.load(str(teacher_path)).graph)
    student = constants(onnx.load(str(student_path)).graph)
    teacher_nodes = [n for n in g.node if n.name.startswith("teacher/")]
    if needs_teacher:
        assert teacher_nodes, f"{where}: no node named teacher/..."
    else:
        assert not teacher_nodes, f"{where}: the loss does not read the teacher, yet {len(teacher_nodes)} teacher nodes remain"
    for node in teacher_nodes:
        for x in list(node.input) + list(node.output):
            assert x == "" or x == "input" or x.startswith("teacher/"), f"{where}: teacher node `{node.name}` uses `{x}`"
    folded = folded_teacher_constants(onnx.load(str(teacher_path)))
    changed = []
    for name, init in j.inits.items():
        if name.startswith("teacher/"):
            orig = name[len("teacher/"):]
            if orig not in teacher and orig in folded:  # a teacher BN written as constants (RUNTIMES.md)
                # (shaped (C, 1, 1) for a Mul / Add, (C,) for a Conv bias)
                np.testing.assert_allclose(numpy_helper.to_array(init).reshape(-1), folded[orig], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{where}: `{name}` is not the folded teacher BN")
                continue
            assert orig in teacher, f"{where}: `{name}` is neither an initializer of the teacher nor a folded BN constant"
            if not np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(teacher[orig])):
                changed.append(name)
        elif name in student:
            assert np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(student[name])), f"{where}: student `{name}` changed"
        else:
            # Added tensors live under kd/...; the constant weights of the total sit beside the
            # term outputs they scale (loss/<term>/weight), which DESIGN.md does not name.
            assert name.startswith("kd/") or (name.startswith("loss/") and name not in req + frozen), (
                f"{where}: initializer `{name}` is neither teacher/, a student name, kd/... nor a loss weight"
            )
    assert not changed, (
        f"{where}: {len(changed)} teacher initializers keep their teacher name but not its value, e.g. {changed[:3]}"
    )
    for name in req + frozen:
        if name not in student:
            assert any(name.startswith(f"kd/{m}/") for m in methods), f"{where}: added parameter `{name}` not under kd/<method>/"
    student_params = {n for n, i in student.items() if is_float(i)}
    bn_stats = {x for n in g.node if n.op_type == "BatchNormalization" for x in n.input[3:5]}
    student_bn_stats = {x for x in bn_stats if not x.startswith("teacher/")}
    missing = sorted(n for n in (student_params - bn_stats) if n in init_names and n in reached and n not in req)
    assert not missing, f"{where}: student parameters that reach the loss but are not in requires_grad: {missing}"
    assert student_bn_stats <= set(frozen), f"{where}: BN running statistics not frozen: {sorted(student_bn_stats - set(frozen))}"

    # BatchNormalization: inference form only, and none in the teacher unless it runs on batch statistics.
    batch_stats = sc["hyper"].get("teacher_batch_statistics", False)
    for node in g.node:
        if node.op_type == "BatchNormalization":
            assert len(node.output) == 1, f"{where}: BN `{node.name}` has {len(node.output)} outputs"
            assert all(not (a.name == "training_mode" and a.i) for a in node.attribute), f"{where}: BN `{node.name}` in training mode"
            assert batch_stats or not node.name.startswith("teacher/"), f"{where}: teacher BN `{node.name}` not folded"

    # Tap shapes and pools.
    for p in sc["pairs"]:
        t_shape, s_shape = p["teacher"]["shape"], p["student"]["shape"]
        # FSP pools within a net, not between them; AB's and FitNet's connectors resize the student.
        if len(t_shape) == 4 and p["method"] not in ("fsp", "ab", "fitnet"):
            assert (p["pool"] is None) == (t_shape[2:] == s_shape[2:]), f"{where}: pool {p['pool']!r} for {t_shape} / {s_shape}"

    props = {p.key: p.value for p in model.metadata_props}
    version = [v for k, v in props.items() if "version" in k]
    assert version == [kdgraph_version], f"{where}: metadata_props {props}: no kdgraph version {kdgraph_version}"
    listed = [v for k, v in props.items() if "method" in k]
    assert len(listed) == 1 and re.split(r"[,\s]+", listed[0].strip()) == sc["methods"], f"{where}: metadata_props {props}"


# --------------------------------------------------------------------------- ORT Training


def teacher_initializers(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("teacher/")}


def first_student_conv_weight(j: Joint) -> str:
    node = next(n for n in j.model.graph.node if n.op_type == "Conv" and not n.name.startswith(("teacher/", "kd/")))
    return node.input[1]


def state_pairs(sidecar: dict) -> Dict[str, str]:
    """{state input: the output that updates it (`<input>_next`)}."""
    outputs = {o["name"] for o in sidecar["outputs"]}
    return {i["name"]: i["name"] + train_ort.STATE_SUFFIX for i in sidecar["inputs"]
            if i["role"] == "state" and i["name"] + train_ort.STATE_SUFFIX in outputs}


# A term that trains falls by more than this fraction in TRAIN_STEPS steps on one batch (measured
# at 15 steps, torch 2.15 / ORT Training 1.19.2: VID with --gamma 0 on the committed pair, the
# slowest, by 7%, OFD on a resized pair by 11%, the others by 20% to 100%; at 30 steps VID by 10%).
TERM_FALL = 0.05


def check_ort_training(
    j: Joint, workdir: Path, feeds: Dict[str, np.ndarray], tmp_path: Path, watched: str, term: Optional[str] = None,
    steps: int = TRAIN_STEPS,
):
    """Loss falls over `steps` steps (TRAIN_STEPS); `term` (a method's own term) falls by TERM_FALL too;
    `watched` changes; the teacher stays bit-identical; for a graph with student outputs, the
    exported student reproduces the eval-mode module.

    The loss alone proves little where it holds cross-entropy: CE falls on one batch whatever
    the method's term does (PKT's term rises tenfold in the default-weight graph while its loss
    falls). So `term` is given for graphs whose loss is the term alone (--gamma 0, init stages).

    Returns the trained Stage.
    """
    where = f"{method_id(j.methods)} {j.stage_name}"
    stage = new_stage(j, workdir)
    before = stage.parameter(watched)

    watched_outputs = ["loss"] + ([term] if term else [])
    history: Dict[str, List[float]] = {n: [] for n in watched_outputs}
    links = state_pairs(stage.sidecar)
    next_feeds = dict(feeds)
    for _ in range(steps):
        out = stage.step(next_feeds)
        for n in watched_outputs:
            history[n].append(float(out[n]))
        next_feeds.update({k: out[nxt] for k, nxt in links.items()})
    last = stage.forward_backward(next_feeds)
    losses, final = history["loss"], float(last["loss"])
    assert np.all(np.isfinite(losses)) and np.isfinite(final), f"{where}: non-finite loss {losses} / {final}"
    assert final < losses[0], f"{where}: loss did not fall in {steps} steps: {losses[0]} -> {final} ({losses})"
    if term:
        assert term in j.loss_names, f"{where}: no output `{term}` among {j.loss_names}"
        first, last_term = history[term][0], float(last[term])
        assert np.isfinite(last_term) and last_term < (1 - TERM_FALL) * first, (
            f"{where}: `{term}` did not fall by {TERM_FALL:.0%} in {steps} steps: {first:.6g} -> {last_term:.6g} "
            f"({[float(f'{v:.4g}') for v in history[term]]})"
        )
    assert not np.array_equal(stage.parameter(watched), before), f"{where}: `{watched}` did not change"

    # The teacher: constant initializers of the training and eval models, bit-identical to the
    # joint graph's, and never a checkpoint parameter. ORT may fold teacher Constant nodes into
    # new initializers (teacher//Constant_1_output_0): those compare with the Constant's value.
    joint_teacher = teacher_initializers(j.model)
    joint_constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in j.model.graph.node
        if n.op_type == "Constant" and n.name.startswith("teacher/") and n.attribute[0].name == "value"
    }
    for which in ("training_model.onnx", "eval_model.onnx"):
        m = onnx.load(str(workdir / which))
        assert not [i.name for i in m.graph.input if i.name.startswith("teacher/")], f"{where} {which}: teacher weights as inputs"
        got = teacher_initializers(m)
        if which == "training_model.onnx":
            # Weights must all be there; integer shape constants (a Reshape's shape) ORT may fold.
            lost = sorted(n for n in set(joint_teacher) - set(got) if joint_teacher[n].dtype.kind == "f")
            assert not lost, f"{where}: teacher initializers missing from the training model: {lost[:5]}"
        for name, arr in got.items():
            ref = joint_teacher.get(name, joint_constants.get(name))
            if ref is None:
                continue  # made by ORT from something else (e.g. a shape computation)
            assert np.array_equal(arr, ref), f"{where} {which}: teacher tensor `{name}` differs from {j.path.name}"
    # The trained checkpoint, saved and read back: teacher tensors are not parameters (frozen
    # ones would be; then they must still equal the joint graph's).
    reloaded = stage.save_checkpoint(tmp_path / f"trained-{j.stage_name}.ckpt")
    for name, param in reloaded.parameters:
        if name.startswith("teacher/"):
            assert np.array_equal(np.array(param.data), joint_teacher[name]), f"{where}: checkpoint `{name}` changed"
            assert not param.requires_grad, f"{where}: teacher `{name}` is trainable"

    # The exported student reproduces the eval-mode module (graphs with student outputs only:
    # an init stage's graph ends at the student's taps).
    if j.student_outputs:
        eval_out = stage.evaluate(next_feeds)
        exported = stage.export(tmp_path / f"student-{j.stage_name}.onnx")
        m = onnx.load(str(exported))
        assert [i.name for i in m.graph.input] == ["input"], f"{where}: exported student inputs {[i.name for i in m.graph.input]}"
        assert not [i.name for i in m.graph.initializer if i.name.startswith(("teacher/", "kd/"))], f"{where}: teacher or kd tensors in the student"
        sess = ort.InferenceSession(str(exported), session_options(), providers=["CPUExecutionProvider"])
        logits = sess.run(j.student_outputs, {"input": feeds["input"]})[0]
        np.testing.assert_allclose(logits, eval_out[j.student_outputs[0]], rtol=EXPORT_TOL, atol=EXPORT_TOL,
                                   err_msg=f"{where}: exported student vs eval-mode module")
        if watched in {i.name for i in m.graph.initializer}:
            exported_watched = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == watched))
            assert np.array_equal(exported_watched, stage.parameter(watched)), f"{where}: exported `{watched}` is not the trained one"
    return stage


def assert_finite_step(stage: train_ort.Stage, feeds, what: str):
    """One forward/backward and update: finite loss outputs, gradients and parameters."""
    outputs = stage.forward_backward(feeds)
    bad = {n: float(v) for n, v in outputs.items() if n.startswith("loss") and not np.isfinite(v)}
    assert not bad, f"{what}: non-finite training outputs {bad}"
    names = list(stage.parameters(trainable_only=True))
    grads = {n: stage.gradient(n) for n in names}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"{what}: no gradient for {missing[:5]}"
    bad = [n for n, g in grads.items() if not np.all(np.isfinite(g))]
    assert not bad, f"{what}: non-finite gradients of {len(bad)} parameters, e.g. {bad[:5]}"
    stage.optimizer.step()
    bad = [n for n in names if not np.all(np.isfinite(stage.parameter(n)))]
    assert not bad, f"{what}: non-finite parameters after the step, e.g. {bad[:5]}"
    return outputs


# --------------------------------------------------------------------------- PyTorch taps


_FROZEN_FEATS: Dict[tuple, tuple] = {}


def frozen_feats(name: str, seed: int, x: np.ndarray, preact: bool = False, train: bool = False):
    """(feats, logits) of build(name) in float64 without gradient, cached per batch seed; eval
    mode, or train mode (batch-statistics BN) with `train`."""
    key = (name, seed, preact, x.shape, train)
    if key not in _FROZEN_FEATS:
        model = mf.build(name).double().train(train)
        with torch.no_grad():
            _FROZEN_FEATS[key] = model(torch.from_numpy(x).double(), is_feat=True, preact=preact)
    return _FROZEN_FEATS[key]


def pick_feat(feats, logits, stage: str):
    """The feat that a model's own stage name in a pair denotes (stem -> feats[0], stageK -> feats[K], ...)."""
    if stage == "logits":
        return logits
    if stage == "embedding":
        return feats[-1]
    if stage == "stem":
        return feats[0]
    m = re.fullmatch(r"stage(\d+)", stage)
    assert m, f"unknown stage name {stage!r}"
    return feats[int(m.group(1))]


def torch_taps(j: Joint, x: np.ndarray, seed, train: bool, student: Optional[torch.nn.Module] = None):
    """({joint tensor name: float64 tensor} for every tap from the PyTorch models, the student).

    Student: build(name) in train mode (batch statistics, as ORT trains; with autograd) when
    `train`, else eval (no gradient, cached); teacher: build(name).eval(), or in train mode when
    `train` and the graph keeps the teacher's BNs (--teacher-batch-statistics: ORT Training runs
    them on batch statistics). Taps are mapped by the sidecar's stage names, pre-ReLU (preact)
    ones for the methods of PREACT_METHODS. `student`: the train-mode float64 module to run (one
    being trained) instead of a fresh build; `seed` keys the cache of the teacher's taps.
    """
    teacher_train = train and j.sidecar["hyper"].get("teacher_batch_statistics", False)
    (t_name, _), (s_name, _) = PAIRS[j.pair]
    if train:
        student = student if student is not None else mf.build(s_name).double().train()
        x_s = torch.from_numpy(x).to(next(student.parameters()).dtype)
        s_out = {}

        def s_feats(preact):  # one forward pass per tap kind, the same parameters (autograd sums both)
            if preact not in s_out:
                s_out[preact] = student(x_s, is_feat=True, preact=preact)
            return s_out[preact]
    else:
        student = None

        def s_feats(preact):
            return frozen_feats(s_name, seed, x, preact)

    values = {}
    if j.student_outputs:
        values[j.student_outputs[0]] = s_feats(False)[1]
    for p in j.sidecar["pairs"]:
        preact = p["method"] in PREACT_METHODS
        values[p["student"]["tensor"]] = pick_feat(*s_feats(preact), p["student_stage"])
        values["teacher/" + p["teacher"]["tensor"]] = pick_feat(*frozen_feats(t_name, seed, x, preact, teacher_train), p["teacher_stage"])
    return values, student


def check_taps_match_torch(j: Joint, x: np.ndarray, y: np.ndarray, seed: int, feeds_extra: Optional[dict] = None):
    """The stage -> feats mapping is right: eval-mode torch taps equal the graph's own (those it computes)."""
    want_eval, _ = torch_taps(j, x, seed, train=False)
    computed = {o for n in j.model.graph.node for o in n.output}
    want_eval = {k: v for k, v in want_eval.items() if k in computed}
    got_eval = run_with_taps(j.model, list(want_eval), {"input": x, "labels": y, **(feeds_extra or {})})
    for name, v in want_eval.items():
        np.testing.assert_allclose(got_eval[name], v.detach().numpy(), rtol=1e-3, atol=1e-3,
                                   err_msg=f"tap `{name}` is not the torch feat its stage names")


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"shapes {got.shape} vs {want.shape}"
    assert np.linalg.norm(want) > 0, "zero reference gradient"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
