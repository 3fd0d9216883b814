"""The Python package (python/kdgraph): the export helpers on torchvision models, the API against the
binary under test, and (opt-in, KDGRAPH_WHEEL=1) the wheel installed into a fresh virtual environment."""

import copy
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import venv
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

import exports
from conftest import ROOT
from heavy import cases

sys.path.insert(0, str(ROOT / "python"))
import kdgraph  # noqa: E402  (the package under test, from the source tree)
from kdgraph._api import flags  # noqa: E402

TEACHER = ROOT / "fixtures" / "resnet56.onnx"
STUDENT = ROOT / "fixtures" / "resnet20.onnx"
MODELS = ("resnet18", "mobilenet_v2", "convnext_tiny")
# BatchNorm (resnet18) and LayerNorm (convnext_tiny) by default; mobilenet_v2 under KDGRAPH_HEAVY=1.
MODEL_PARAMS = cases([(name,) for name in MODELS], lambda c: c != ("mobilenet_v2",), lambda c: c[0])
EXPORTERS = {"teacher": kdgraph.export_teacher, "student": kdgraph.export_student}


# ---------------------------------------------------------------------------------------------
# (a) The export helpers on torchvision models.

def build(name):
    """exports.build's seeded model (BatchNorms with perturbed statistics), its random layers off:
    Dropout and stochastic depth draw from torch's generator in PyTorch and from ORT's in the file,
    so no comparison of a training-mode forward could match with them on. With p = 0 the exporter
    writes the same graph less the random keep-masks; the norms, the convolutions and the residual
    structure, which the helpers must keep, are all there."""
    model = exports.build(name)
    for module in model.modules():
        if isinstance(module, (nn.Dropout, torchvision.ops.StochasticDepth)):
            module.p = 0.0
    return model


def _digest():
    """Hash of what an export depends on: the helpers, exports.py's models and build() above."""
    files = (ROOT / "python" / "kdgraph" / "export.py", Path(exports.__file__))
    source = b"".join(f.read_bytes() for f in files) + inspect.getsource(build).encode()
    return hashlib.sha256(source).hexdigest()[:10]


def exported(name, role):
    """The cached export of `name` by kdgraph.export_<role> (tests/python/.cache/torchvision/package-*)."""
    version = torch.__version__.replace("+", "_")
    final = exports.CACHE / f"package-{version}-{name}-{role}-{_digest()}"
    stale = re.compile(rf"package-[^-]+-{re.escape(name)}-{role}-[0-9a-f]+(\.partial)?")
    x = torch.from_numpy(exports.input_batch(name))
    return exports.cached_export(final, stale, lambda path: EXPORTERS[role](build(name), x, path))


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def module_norms(model):
    return {
        "BatchNormalization": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "LayerNormalization": sum(isinstance(m, nn.LayerNorm) for m in model.modules()),
    }


def ort_logits(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def torch_logits(model, x, train):
    """The module's logits in float64 (so that the comparison measures the file's float32 rounding)."""
    model = copy.deepcopy(model).double().train(train)
    with torch.no_grad():
        return model(torch.from_numpy(x).double()).numpy()


def assert_close(got, want):
    """Equal up to float32 rounding (measured: at most 3e-6 on logits of scale 1 for these models)."""
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * max(scale, 1.0))


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_teacher_export_keeps_norms_and_gives_eval_outputs(name):
    """export_teacher writes every BatchNorm and LayerNorm of the module as a node in inference form,
    a dynamic batch axis, `input` and `logits`, and the module's eval-mode outputs."""
    path = exported(name, "teacher")
    model = build(name)
    found = ops(path)
    for op, count in module_norms(model).items():
        assert found[op] == count, (op, found[op], count)
    graph = onnx.load(str(path)).graph
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            assert all(a.i == 0 for a in node.attribute if a.name == "training_mode"), node.name
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param, "dynamic batch axis"
    x = exports.input_batch(name, batch=3)  # not the export's batch of 2
    assert_close(ort_logits(path, x), torch_logits(model, x, train=False))


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_student_export_keeps_norms_in_training_form(name):
    """export_student writes every BatchNorm in training form (training_mode=1: batch statistics,
    as ORT Training trains it) and every LayerNorm, and the file computes the module's
    training-mode forward: both normalise with the batch's statistics, so the comparison is exact
    up to rounding (the random layers are off, see build)."""
    path = exported(name, "student")
    model = build(name)
    found = ops(path)
    for op, count in module_norms(model).items():
        assert found[op] == count, (op, found[op], count)
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "BatchNormalization":
            assert [a.i for a in node.attribute if a.name == "training_mode"] == [1], node.name
    x = exports.input_batch(name, batch=3)
    train = torch_logits(model, x, train=True)
    assert_close(ort_logits(path, x), train)
    if found["BatchNormalization"]:  # the comparison tells batch statistics from running ones
        assert np.abs(train - torch_logits(model, x, train=False)).max() > 0.1


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_student_export_holds_the_module_statistics(name, tmp_path):
    """The running statistics in the student's file are the module's, not the ones the
    training-mode trace moved: with its BatchNorms switched to inference form (what ORT Training's
    export for inference does), the file gives the module's eval-mode outputs. (Left as the trace
    wrote them, the statistics are one momentum step off: logits off by 0.16 for resnet18, 0.43 for
    mobilenet_v2.)"""
    model = build(name)
    x = exports.input_batch(name, batch=3)
    proto = onnx.load(str(exported(name, "student")))
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            for attribute in node.attribute:
                if attribute.name == "training_mode":
                    attribute.i = 0
            del node.output[1:]
    converted = tmp_path / "eval.onnx"
    onnx.save(proto, str(converted))
    assert_close(ort_logits(converted, x), torch_logits(model, x, train=False))


def test_export_student_leaves_the_module_untouched(tmp_path):
    """The student is exported from a copy: the module's statistics and mode do not change."""
    model = build("resnet18").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kdgraph.export_student(model, torch.from_numpy(exports.input_batch("resnet18")), tmp_path / "s.onnx")
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_exports_merge_without_a_normalisation_warning(name, kdgraph_bin, monkeypatch):
    """kdgraph plans KD + AT between the two exports and sees the student's normalisation, BatchNorm
    or LayerNorm (ConvNeXt): the plan carries no warning."""
    monkeypatch.setenv("KDGRAPH_BIN", str(kdgraph_bin))
    plan = kdgraph.merge(exported(name, "teacher"), exported(name, "student"), ["kd", "at"], dry_run=True)["plan"]
    assert plan["warnings"] == []
    assert {p["method"] for p in plan["pairs"]} == {"kd", "at"}


class SmallConvNet(nn.Module):
    """Two strided convs, each followed by `norm(channels)` (or nothing) and ReLU, pooled, linear."""

    def __init__(self, norm=None):
        super().__init__()
        layers = []
        for cin, cout in ((3, 8), (8, 16)):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1)]
            layers += [norm(cout)] if norm else []
            layers += [nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("norm, warned", [(lambda c: nn.GroupNorm(4, c), False), (None, True)],
                         ids=["groupnorm", "no-norm"])
def test_normalisation_warning_follows_the_student(norm, warned, kdgraph_bin, monkeypatch, tmp_path):
    """A GroupNorm student has normalisation (no warning); one without any gets the warning, which
    points to kdgraph.export_student and the TorchScript flags that keep BatchNorms on torch 2.15."""
    monkeypatch.setenv("KDGRAPH_BIN", str(kdgraph_bin))
    torch.manual_seed(0)
    path = kdgraph.export_student(SmallConvNet(norm), torch.randn(2, 3, 32, 32), tmp_path / "s.onnx")
    warnings = kdgraph.merge(path, path, "kd", dry_run=True)["plan"]["warnings"]
    if warned:
        assert len(warnings) == 1 and "has no normalisation" in warnings[0], warnings
        assert "kdgraph.export_student" in warnings[0] and "do_constant_folding=False" in warnings[0]
    else:
        assert warnings == []


# ---------------------------------------------------------------------------------------------
# (b) The API against the binary under test, on the fixtures.

@pytest.fixture
def api(kdgraph_bin, monkeypatch):
    """kdgraph, calling the binary under test."""
    monkeypatch.setenv("KDGRAPH_BIN", str(kdgraph_bin))
    return kdgraph


def test_inspect_returns_what_inspect_json_prints(api, kdgraph_bin):
    found = api.inspect(STUDENT)
    printed = subprocess.run([str(kdgraph_bin), "inspect", str(STUDENT), "--json"], capture_output=True,
                             text=True, check=True).stdout
    assert found == json.loads(printed)
    assert [s["name"] for s in found["stages"]] == ["stem", "stage1", "stage2", "stage3"]
    assert found["logits"] == {"tensor": "logits", "shape": ["N", 100]}


def test_merge_dry_run_returns_the_plan_and_writes_nothing(api, tmp_path):
    result = api.merge(TEACHER, STUDENT, ["kd", "at"], out=tmp_path / "joint.onnx", dry_run=True,
                       beta={"at": 500}, temperature=2)
    assert result["written"] == []
    plan = result["plan"]
    assert plan["methods"] == ["kd", "at"]
    assert plan["hyper"]["beta"] == {"at": 500.0} and plan["hyper"]["temperature"] == 2.0
    assert [p["stage"] for p in plan["pairs"]] == ["logits", "stage1", "stage2", "stage3"]
    assert list(tmp_path.iterdir()) == []


def test_merge_options_become_flags(api):
    """Method options by their flag names, tap pairs, and the step options reach the binary."""
    plan = api.merge(TEACHER, STUDENT, "crd", dry_run=True, crd_n_data=500, crd_negatives=64)["plan"]
    assert plan["hyper"]["crd"]["n_data"] == 500 and plan["hyper"]["crd"]["negatives"] == 64
    pair = ("/layer3/layer3.8/Relu_1_output_0", "/layer3/layer3.2/Relu_1_output_0")
    plan = api.merge(TEACHER, STUDENT, "at", dry_run=True, taps=[pair])["plan"]
    assert [(p["teacher"]["tensor"], p["student"]["tensor"]) for p in plan["pairs"]] == [pair]
    assert flags({"betas": (0.9, 0.99), "nesterov": True, "no_check": False, "emit": None,
                  "beta": {"at": 10}, "tap": {"t": "s"}, "weight_decay": 0.0}) == [
        "--betas", "0.9,0.99", "--nesterov", "--beta", "at=10", "--tap", "t=s", "--weight-decay", "0.0"]


def test_merge_writes_the_graphs_and_reports_them(api, tmp_path):
    out = tmp_path / "joint.onnx"
    result = api.merge(TEACHER, STUDENT, ["kd", "at"], out=out, emit="gradients", check_batch=2)
    written = [Path(p) for p in result["written"]]
    assert written == [out, out.with_suffix(".json"), tmp_path / "joint.grad.onnx"]
    assert all(p.is_file() for p in written)
    assert result["plan"]["methods"] == ["kd", "at"]
    [run] = result["check"]
    assert [t["name"] for t in run["terms"]] == ["loss", "loss/ce", "loss/kd", "loss/at"]
    assert all(np.isfinite(t["value"]) for t in run["terms"])


def test_errors_raise_kdgraph_error_with_the_message(api, tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(kdgraph.KdgraphError) as error:
        api.merge(TEACHER, missing, "kd", dry_run=True)
    assert error.value.exit_code == 1
    assert str(missing) in error.value.message and not error.value.message.startswith("error")
    assert "\n" not in error.value.message
    with pytest.raises(kdgraph.KdgraphError) as error:
        api.merge(TEACHER, STUDENT, "kd", dry_run=True, temperature=0)
    assert error.value.exit_code == 2 and "temperature" in error.value.message
    with pytest.raises(kdgraph.KdgraphError) as error:
        api.merge(TEACHER, STUDENT, "kd", dry_run=True, bogus=1)
    assert error.value.exit_code == 2
    assert error.value.message == "unexpected argument '--bogus' found"


def test_a_wrong_kdgraph_bin_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KDGRAPH_BIN", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="KDGRAPH_BIN"):
        kdgraph.inspect(STUDENT)


# ---------------------------------------------------------------------------------------------
# (c) The wheel, built and installed into a fresh virtual environment (opt-in: a release build).

@pytest.mark.skipif(os.environ.get("KDGRAPH_WHEEL") != "1",
                    reason="KDGRAPH_WHEEL=1 builds the release wheel (several minutes)")
def test_wheel_runs_the_worked_example_without_torch(tmp_path):
    """`pip wheel .` builds the wheel; installed with --no-deps into a new environment (no torch,
    no onnx), its bundled binary is found and the worked example inspects and merges the fixtures."""
    started = time.monotonic()
    dist = tmp_path / "dist"
    run_ok([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(dist)], timeout=3600)
    [wheel] = dist.glob("kdgraph-*.whl")
    built = time.monotonic()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run_ok([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    environ = {k: v for k, v in os.environ.items() if k not in ("KDGRAPH_BIN", "PYTHONPATH")}
    located = run_ok([str(python), "-c", "import kdgraph; print(kdgraph.find_binary()); print(kdgraph.__file__)"],
                  env=environ, cwd=tmp_path).splitlines()
    assert located[0] == str(env_dir / "bin" / "kdgraph")
    assert located[1].startswith(str(env_dir))
    out = run_ok([str(python), str(ROOT / "examples" / "python_api.py"), str(tmp_path / "out"),
               "--teacher", str(TEACHER), "--student", str(STUDENT)], env=environ, cwd=tmp_path)
    assert "at stage3:" in out and "wrote joint.onnx, joint.json" in out, out
    print(f"wheel built in {built - started:.0f} s; installed and ran in {time.monotonic() - built:.0f} s")


def run_ok(command, timeout=600, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout
