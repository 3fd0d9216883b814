"""`--tap` by module path and by stage index, and the module paths `inspect` shows, on torchvision's
resnet18 exported by both PyTorch exporters (TorchScript names its nodes by module path;
torch.export records the path in each node's metadata, `pkg.torch.onnx.name_scopes`).

The tensor a module path picks is checked against PyTorch itself: its values in onnxruntime must
be the module's output, as a forward hook on that torchvision module sees it (the last call's,
for a module called more than once), so the same module path picks the same tensor in both
exports, whatever each exporter calls it.
"""

import json
import subprocess
import sys

import pytest
import torch

import exports
from conftest import ROOT
from test_torchvision_taps import close, mismatch, run_with_outputs

sys.path.insert(0, str(ROOT / "python"))
import kdgraph  # noqa: E402  (the package under test, from the source tree)

NAME = "resnet18"
# Containers, blocks, and layers off the main path (a BatchNorm, a convolution inside a block).
MODULES = ("layer1", "layer2", "layer3", "layer4", "layer2.0", "layer3.1", "layer1.0.bn1", "layer4.1.conv2")
# (teacher export, student export): each exporter on each side.
EXPORTS = (("ts-train", "dynamo-noopt"), ("dynamo-noopt", "ts-train"))


def hooked_outputs(modules):
    """PyTorch's float64 output of each module on exports.input_batch(NAME), eval mode."""
    model = exports.build(NAME)
    seen = {}
    hooks = [model.get_submodule(m).register_forward_hook(
        lambda mod, inp, out, m=m: seen.__setitem__(m, out.detach().clone())) for m in modules]
    with torch.no_grad():
        model.double()(torch.from_numpy(exports.input_batch(NAME)).double())
    for h in hooks:
        h.remove()
    return {m: seen[m].numpy() for m in modules}


def run_kdgraph(kdgraph_bin, *args, check=True):
    run = subprocess.run([str(kdgraph_bin), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert run.returncode == 0, f"kdgraph {' '.join(map(str, args))} failed:\n{run.stderr}"
    return run


def plan(kdgraph_bin, teacher, student, taps):
    args = ["merge", teacher, student, "-m", "at", "--dry-run", "--json"]
    args += [a for t, s in taps for a in ("--tap", f"{t}={s}")]
    return json.loads(run_kdgraph(kdgraph_bin, *args).stdout)


def check_values(path, chosen, want):
    """Each (label, tensor) of `chosen` holds `want[label]` in onnxruntime."""
    got = run_with_outputs(path, [t for _, t in chosen], exports.input_batch(NAME))
    wrong = [f"{label} -> `{t}`: {mismatch(got[t], want[label])}" for label, t in chosen
             if not close(got[t], want[label])]
    assert not wrong, f"{path}: tensors that are not the module's output:\n" + "\n".join(wrong)


@pytest.mark.parametrize("teacher_mode,student_mode", EXPORTS)
def test_a_module_path_picks_the_modules_output(kdgraph_bin, teacher_mode, student_mode):
    teacher, student = exports.export(NAME, teacher_mode), exports.export(NAME, student_mode)
    result = plan(kdgraph_bin, teacher, student, [(m, m) for m in MODULES])
    pairs = result["pairs"]
    assert len(pairs) == len(MODULES), pairs
    want = hooked_outputs(MODULES)
    for role, path in (("teacher", teacher), ("student", student)):
        chosen = [(m, p[role]["tensor"]) for m, p in zip(MODULES, pairs)]
        check_values(path, chosen, want)
        for module, tensor in chosen:
            note = f"--tap: {role} module `{module}` names `{tensor}`"
            assert any(n.startswith(note) for n in result["notes"]), (note, result["notes"])
    # TorchScript names the block's last ReLU by its module path and call: the tensor that
    # `--tap layer3=...` must pick, by name.
    ts_role = "teacher" if teacher_mode.startswith("ts-") else "student"
    assert pairs[2][ts_role]["tensor"] == "/layer3/layer3.1/relu_1/Relu_output_0", pairs[2]
    # The same pairs by tensor name.
    by_name = plan(kdgraph_bin, teacher, student, [(p["teacher"]["tensor"], p["student"]["tensor"]) for p in pairs])
    assert [(p["teacher"], p["student"]) for p in by_name["pairs"]] == [(p["teacher"], p["student"]) for p in pairs]
    assert not any(n.startswith("--tap:") for n in by_name["notes"]), by_name["notes"]


@pytest.mark.parametrize("teacher_mode,student_mode", EXPORTS[:1])
def test_a_stage_index_picks_that_stage(kdgraph_bin, teacher_mode, student_mode):
    teacher, student = exports.export(NAME, teacher_mode), exports.export(NAME, student_mode)
    pairs = plan(kdgraph_bin, teacher, student, [("teacher:0", "student:2"), ("teacher:3", "student:1")])["pairs"]
    want = hooked_outputs(("relu", "layer1", "layer2", "layer3"))
    check_values(teacher, [("relu", pairs[0]["teacher"]["tensor"]), ("layer3", pairs[1]["teacher"]["tensor"])], want)
    check_values(student, [("layer2", pairs[0]["student"]["tensor"]), ("layer1", pairs[1]["student"]["tensor"])], want)


def test_wrong_names_are_refused_with_module_suggestions(kdgraph_bin):
    teacher, student = exports.export(NAME, "ts-train"), exports.export(NAME, "dynamo-noopt")
    for side, tap, wrong in (("student", "layer3=layr2", "layr2"), ("teacher", "layer3.1.rellu=layer2", "layer3.1.rellu")):
        run = run_kdgraph(kdgraph_bin, "merge", teacher, student, "-m", "at", "--dry-run", "--tap", tap, check=False)
        assert run.returncode == 2, run.stderr
        line = run.stderr.strip()
        assert line.count("\n") == 0 and f"no tensor or module `{wrong}`" in line, line
        assert f"{side} `{student if side == 'student' else teacher}`" in line, line
    assert "nearest names: `layer2`" in run_kdgraph(
        kdgraph_bin, "merge", teacher, student, "-m", "at", "--dry-run", "--tap", "layer3=layr2", check=False).stderr
    run = run_kdgraph(kdgraph_bin, "merge", teacher, student, "-m", "at", "--dry-run", "--tap", "teacher:9=student:1", check=False)
    assert run.returncode == 2 and "not 9" in run.stderr, run.stderr
    run = run_kdgraph(kdgraph_bin, "merge", teacher, student, "-m", "at", "--dry-run", "--tap", "student:1=teacher:1", check=False)
    assert run.returncode == 2 and "left of `=`" in run.stderr, run.stderr


@pytest.mark.parametrize("mode", exports.MODES)
def test_inspect_shows_each_taps_module(kdgraph_bin, mode):
    shown = json.loads(run_kdgraph(kdgraph_bin, "inspect", exports.export(NAME, mode), "--json").stdout)
    # The embedding is torch.flatten of avgpool's output (no module of its own), the logits fc's.
    assert (shown.get("embedding_module"), shown.get("logits_module")) == ("avgpool", "fc"), (mode, shown)
    stages = shown["stages"]
    # resnet18 at 64x64: the stem ReLU, then layer1..layer4 (exports.py's expectations), each the
    # output of its last BasicBlock's `relu` (called twice per block: TorchScript names the second
    # call `relu_1`, torch.export records `relu`; both are module `relu`).
    want = ["relu"] + [f"layer{k}.1.relu" for k in range(1, 5)]
    assert [s.get("module") for s in stages] == want, (mode, stages)


def test_the_python_api_passes_taps_through(kdgraph_bin, monkeypatch):
    monkeypatch.setenv("KDGRAPH_BIN", str(kdgraph_bin))
    teacher, student = exports.export(NAME, "ts-train"), exports.export(NAME, "dynamo-noopt")
    taps = [("layer3", "layer2"), ("teacher:1", "student:1")]
    got = kdgraph.merge(teacher, student, "at", dry_run=True, taps=taps)["plan"]["pairs"]
    want = plan(kdgraph_bin, teacher, student, taps)["pairs"]
    assert [(p["teacher"], p["student"]) for p in got] == [(p["teacher"], p["student"]) for p in want]
    assert got[0]["teacher"]["tensor"] == "/layer3/layer3.1/relu_1/Relu_output_0", got[0]
    with pytest.raises(kdgraph.KdgraphError) as error:
        kdgraph.merge(teacher, student, "at", dry_run=True, taps={"layer3": "layr2"})
    assert error.value.exit_code == 2 and "nearest names: `layer2`" in error.value.message
