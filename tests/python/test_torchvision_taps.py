"""`kdgraph inspect` on real torchvision classifiers, exported in the four ways PyTorch offers.

For resnet18, resnet50, vgg16_bn, mobilenet_v2 and wide_resnet50_2 (seeded random weights,
random BatchNorm parameters), each exported by the TorchScript exporter in eval and training
mode and by the torch.export-based exporter with and without its optimiser (see exports.py),
the stem, stage ends, pre-ReLU tensors, embedding and logits that kdgraph reports must be the
tensors that PyTorch forward hooks see on the corresponding torchvision modules: same count,
same shapes, same values in onnxruntime (rtol 1e-3, atol 1e-4). By default resnet18 runs in all
four forms and resnet50, mobilenet_v2 and vgg16_bn in some (DEFAULT_CASES); KDGRAPH_HEAVY=1 runs
every model in every form.

Expected taps (from the module structure, not from kdgraph):
  resnets:      stem = model.relu (before maxpool); stages = layer1..layer4 outputs, each the
                ReLU after the last block's residual Add (pre_relu = that Add).
  vgg16_bn:     the ReLU before each of the 5 MaxPools: the first is the stem, then 4 stages
                (pre_relu = the BatchNorm, or the folded Conv, feeding it).
  mobilenet_v2: stem = features[0] (Conv-BN-ReLU6, a Clip: pre_relu null); stages = features[1], [3], [6], [13], [17]
                (no activation at their ends: pre_relu null); features[18] (1x1 head conv to
                1280) is not a stage.
  embedding:    the input of the final Linear (fc, classifier[6], classifier[1]).
  logits:       the graph output "logits".

Training-mode exports keep BatchNormalization with training_mode=1 (ts-train) and Dropout in
training mode (ts-train, dynamo-noopt). For the value comparison the copy run in onnxruntime
has those nodes rewritten to their inference form (BN with its running statistics, Dropout as
identity): that changes values, never which tensor is which, and makes the graph comparable
to the model in eval mode. The structural checks use the unmodified export.
"""

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exports
from heavy import cases

RTOL, ATOL = 1e-3, 1e-4
ACTIVATION_OPS = {"relu": "Relu", "relu6": "Clip"}
RESNETS = ("resnet18", "resnet50", "wide_resnet50_2")


def inspect(kdgraph_bin, path):
    result = subprocess.run(
        [str(kdgraph_bin), "inspect", str(path), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"kdgraph inspect {path} failed (exit {result.returncode}):\n{result.stderr}"
    assert result.stdout.strip(), f"kdgraph inspect printed nothing:\n{result.stderr}"
    return json.loads(result.stdout)


def producers(graph):
    return {o: n for n in graph.node for o in n.output if o}


def describe(name, prod):
    node = prod.get(name)
    if node is None:
        return f"`{name}` (no producing node)"
    return f"`{name}` ({node.op_type} `{node.name}`)"


def inference_form_copy(path):
    """The model with its weights, BN training_mode=1 and Dropout rewritten to inference form."""
    model = onnx.load(str(path))
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            attrs = [a for a in node.attribute if a.name != "training_mode"]
            if len(attrs) != len(node.attribute) or len(node.output) > 1:
                extra = [o for o in node.output[1:] if o]
                assert not (set(extra) & used), f"BN `{node.name}` statistics outputs are read: {extra}"
                del node.attribute[:]
                node.attribute.extend(attrs)
                del node.output[1:]
        elif node.op_type == "Dropout":
            del node.input[1:]  # no ratio, no training_mode: identity
    return model


def run_with_outputs(path, names, x):
    """Runs the inference-form copy in onnxruntime on `x` with `names` added as outputs."""
    model = inference_form_copy(path)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(names))
    return dict(zip(names, session.run(names, {"input": x})))


def close(got, want):
    return got.shape == want.shape and np.allclose(got, want, rtol=RTOL, atol=ATOL)


def mismatch(got, want):
    if got.shape != want.shape:
        return f"onnxruntime shape {list(got.shape)} vs torch {list(want.shape)}"
    err = np.abs(got - want)
    return (f"values differ: max |diff| {err.max():.3g}, "
            f"{int((err > ATOL + RTOL * np.abs(want)).sum())}/{want.size} elements out of tolerance")


def locate(path, wants, x):
    """Diagnostics: for each (label, array), the graph tensors holding that value."""
    bare = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(bare)
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape"):
            dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    prod = producers(bare.graph)
    wanted_tails = {tuple(w.shape[1:]) for _, w in wants}
    candidates = [n for n in prod if n in dims and len(dims[n]) >= 1
                  and tuple(dims[n][1:]) in wanted_tails
                  and prod[n].op_type not in ("Shape", "Constant", "ConstantOfShape")]
    if not candidates:
        return {label: [] for label, _ in wants}
    got = run_with_outputs(path, candidates, x)
    return {label: [describe(n, prod) for n in candidates if close(got[n], want)]
            for label, want in wants}


def final_linear_input(graph, prod):
    """The data input of the Gemm (or MatMul [+ Add]) that produces the graph output `logits`."""
    inits = {i.name for i in graph.initializer}
    node = prod["logits"]
    if node.op_type == "Add":
        node = next(prod[i] for i in node.input if i not in inits and i in prod)
    assert node.op_type in ("Gemm", "MatMul"), f"logits produced by {node.op_type} `{node.name}`"
    return node.input[0]


def check_export_premise(graph, mode):
    """The export is what its mode promises (BN folded or kept, and in which form)."""
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    training_bns = [n for n in bns if any(a.name == "training_mode" and a.i == 1 for a in n.attribute)]
    if mode in ("ts-eval", "dynamo"):
        assert not bns, f"{mode}: expected BatchNorm folded, found {len(bns)} BatchNormalization nodes"
    elif mode == "ts-train":
        assert bns and len(training_bns) == len(bns) and all(len(n.output) == 3 for n in bns), (
            f"{mode}: expected BatchNormalization with training_mode=1 and 3 outputs")
    else:
        assert bns and not training_bns, f"{mode}: expected inference-form BatchNormalization kept"


# Every export form on resnet18; both TorchScript forms of the bottleneck resnet and of
# mobilenet_v2; vgg16_bn (224x224: four 528 MB exports) once. wide_resnet50_2 is resnet50 wider.
DEFAULT_CASES = ([("resnet18", mode) for mode in exports.MODES]
                 + [(name, mode) for name in ("resnet50", "mobilenet_v2") for mode in ("ts-eval", "ts-train")]
                 + [("vgg16_bn", "dynamo")])
CASES = cases([(name, mode) for name in exports.MODELS for mode in exports.MODES], DEFAULT_CASES.__contains__, "-".join)


@pytest.mark.parametrize("name, mode", CASES)
def test_torchvision_taps(kdgraph_bin, name, mode):
    try:
        path = exports.export(name, mode)
    except exports.ExportFailed as exc:
        pytest.xfail(str(exc))
    graph = onnx.load(str(path), load_external_data=False).graph
    check_export_premise(graph, mode)
    prod = producers(graph)
    ref = exports.reference(name)
    info = inspect(kdgraph_bin, path)
    size = exports.input_size(name)

    assert [i["name"] for i in info["inputs"]] == ["input"], info["inputs"]
    input_shape = info["inputs"][0]["shape"]
    assert isinstance(input_shape[0], str), f"input batch dim should be symbolic: {input_shape}"
    assert input_shape[1:] == [3, size, size], input_shape
    assert info["inputs"][0]["dtype"] == "float32"
    n = input_shape[0]

    stages = info["stages"]
    want_stages = ref["stages"]
    reported = [f"{s['index']}: {describe(s['tensor'], prod)} {s['shape']} pre_relu={s['pre_relu']}"
                for s in stages]
    assert [s["index"] for s in stages] == list(range(len(stages)))

    problems = []
    if len(stages) != len(want_stages):
        # Reported as a failure below; the stages are still compared pairwise, in order, so
        # that the report shows which of them are right.
        problems.append(f"{len(stages)} stages reported, expected {len(want_stages)} "
                        f"(torch shapes {[list(w['value'].shape) for w in want_stages]})")
    # inspect reports what it found, nothing else (warnings belong to a merge's plan).
    required = {"model", "inputs", "stages", "embedding", "logits", "notes"}
    if not required <= set(info) <= required | {"embedding_module", "logits_module"}:
        problems.append(f"unexpected inspect keys: {sorted(info)}")

    def shape_ok(what, shape, want):
        if shape[0] != n or list(shape[1:]) != list(want.shape[1:]):
            problems.append(f"{what}: kdgraph shape {shape}, expected [{n!r}, *{list(want.shape[1:])}]")

    names = []
    for stage, want in zip(stages, want_stages):
        where = f"stage {stage['index']} {describe(stage['tensor'], prod)}"
        shape_ok(where, stage["shape"], want["value"])
        names.append(stage["tensor"])
        pre = stage["pre_relu"]
        if pre:
            names.append(pre)
        act_op = ACTIVATION_OPS.get(want["act"])
        node = prod.get(stage["tensor"])
        if want["act"] == "relu":
            if pre is None:
                problems.append(f"{where}: ends in a ReLU, pre_relu is null")
            elif node is None or node.op_type != act_op or node.input[0] != pre:
                problems.append(f"{where}: pre_relu {describe(pre, prod)} is not the input of a "
                                f"Relu producing the stage tensor")
            elif name in RESNETS and stage["index"] > 0 and (
                    pre not in prod or prod[pre].op_type != "Add"):
                problems.append(f"{where}: pre_relu {describe(pre, prod)} should be the residual Add")
        elif want["act"] == "relu6":
            # ReLU6 is a Clip, not a ReLU: pre_relu is null. A pre-ReLU tap is where a ReLU's
            # boundary at 0 is the only non-linearity (AB's and OFD's margins rest on that);
            # a Clip also cuts at 6, so its input is not one.
            if node is None or node.op_type != act_op:
                problems.append(f"{where}: the stage tensor is not produced by a Clip (ReLU6)")
            if pre is not None:
                problems.append(f"{where}: ends in a ReLU6 (Clip), pre_relu must be null, got {describe(pre, prod)}")
        elif pre is not None:
            problems.append(f"{where}: no activation at this stage end, pre_relu must be null, "
                            f"got {describe(pre, prod)}")
    emb, out = info["embedding"], info["logits"]
    linear_input = final_linear_input(graph, prod)
    if emb["tensor"] != linear_input:
        # Values cannot tell these apart where the copy turns a training Dropout into identity.
        problems.append(f"embedding: kdgraph names {describe(emb['tensor'], prod)}, but the final "
                        f"Linear reads {describe(linear_input, prod)}")
    shape_ok(f"embedding {describe(emb['tensor'], prod)}", emb["shape"], ref["embedding"])
    shape_ok("logits", out["shape"], ref["logits"])
    if out["tensor"] != "logits":
        problems.append(f"logits: kdgraph names {describe(out['tensor'], prod)}, expected `logits`")
    names += [emb["tensor"], out["tensor"]]

    got = run_with_outputs(path, names, exports.input_batch(name))
    wrong = []  # (label, torch value) of taps whose value is wrong, for the diagnostics

    def value_ok(what, label, tensor, want):
        if not close(got[tensor], want):
            problems.append(f"{what}: {mismatch(got[tensor], want)}")
            wrong.append((label, want))

    for stage, want in zip(stages, want_stages):
        i = stage["index"]
        where = f"stage {i} {describe(stage['tensor'], prod)}"
        value_ok(where, f"stage {i}", stage["tensor"], want["value"])
        if stage["pre_relu"]:
            pre_where = f"stage {i} pre_relu {describe(stage['pre_relu'], prod)}"
            if want["pre"] is None:
                pass  # already reported above: no activation here
            else:
                value_ok(pre_where, f"stage {i} pre-activation", stage["pre_relu"], want["pre"])
                bound = 6.0 if want["act"] == "relu6" else np.inf
                if not close(np.clip(got[stage["pre_relu"]], 0.0, bound), got[stage["tensor"]]):
                    problems.append(f"{pre_where}: activation of pre_relu is not the stage tensor")
    value_ok(f"embedding {describe(emb['tensor'], prod)}", "embedding", emb["tensor"], ref["embedding"])
    value_ok("logits", "logits", out["tensor"], ref["logits"])

    if problems:
        detail = ""
        if wrong:
            found = locate(path, wrong, exports.input_batch(name))
            detail = "\nwhere the expected values are in the graph:\n" + "\n".join(
                f"  {label}: {', '.join(found[label]) or 'no single tensor holds it'}"
                for label, _ in wrong)
        pytest.fail(f"{name} {mode}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
                    + f"\nkdgraph reported: {reported}; embedding {emb['tensor']}; notes: {info['notes']}"
                    + detail)


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@pytest.fixture
def failing_exporter(monkeypatch, tmp_path):
    """exports.export with torch.onnx.export raising, on a tiny model, caching under tmp_path."""
    def boom(*args, **kwargs):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(exports, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(exports, "build", lambda name: _Tiny())
    monkeypatch.setattr(torch.onnx, "export", boom)
    return tmp_path / "cache"


def test_an_unknown_export_failure_fails(failing_exporter):
    """An exporter error that KNOWN_EXPORT_FAILURES does not record for this torch propagates (the
    test fails), instead of turning into an xfail; nothing is left in the cache."""
    with pytest.raises(RuntimeError, match="exporter exploded"):
        exports.export("resnet18", "dynamo")
    assert not list(failing_exporter.glob("*")), list(failing_exporter.glob("*"))


def test_a_known_export_failure_names_version_and_reason(failing_exporter, monkeypatch):
    """A failure recorded for this torch version (and only for it) becomes ExportFailed, whose message
    (the xfail's reason) names the version and the recorded reason."""
    monkeypatch.setattr(exports, "KNOWN_EXPORT_FAILURES",
                        {("dynamo", "resnet18"): [("0.1.", "not this version"), (torch.__version__, "a recorded limit")]})
    with pytest.raises(exports.ExportFailed) as info:
        exports.export("resnet18", "dynamo")
    message = str(info.value)
    assert f"torch {torch.__version__}" in message and "a recorded limit" in message and "exporter exploded" in message, message
    assert exports.known_export_failure("resnet18", "dynamo", version="0.2.0") is None
    with pytest.raises(RuntimeError, match="exporter exploded"):
        exports.export("resnet18", "ts-eval")  # recorded for dynamo only
