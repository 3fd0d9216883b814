"""examples/train_ort.py's command line: ORT's logging is quiet, and an ORT failure is one line.

ORT Training logs dozens of INFO lines while it builds the gradient graph and opens its sessions,
and fails with a C++ source location, a signature and a Python traceback. The command line must
print neither: a run that trains prints its progress only, a run that ORT refuses prints
`error: ORT Training failed on <graph file>: <ORT's reason>` on one line and exits with 1.

The failing graph is a joint graph written by kdgraph (the committed pair, KD) with one student
Relu on the trainable path replaced by Softplus, which ORT Training 1.19 has no gradient builder
for; its sidecar's model_hash is recomputed as kdgraph computes it, so that train_ort's own check
(graph and sidecar from one merge) passes and the failure is ORT's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import train_ort
from conftest import ROOT
from merge_checks import PAIRS, COMMITTED, Joint, gradient_path

TRAIN_ORT = ROOT / "examples" / "train_ort.py"


def run_cli(sidecar: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN_ORT), str(sidecar), "--steps", "2", "--batch", "4", "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def joint_kd(merge) -> Path:
    teacher, student = PAIRS[COMMITTED]
    return merge(teacher, student, ["kd"])


def copy_joint(joint: Path, dest: Path) -> Path:
    """joint.onnx and joint.json copied into `dest`; the copy's .json."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(joint, dest / joint.name)
    shutil.copy(joint.with_suffix(".json"), dest / joint.with_suffix(".json").name)
    return dest / joint.with_suffix(".json").name


def softplus_instead_of_relu(sidecar_path: Path) -> str:
    """Replaces the first student Relu between a trainable parameter and the loss by Softplus, in
    place, and writes the graph's new model_hash into the sidecar; the node's name."""
    sidecar = json.loads(sidecar_path.read_text())
    model_path = sidecar_path.parent / sidecar["model"]
    j = Joint(model_path, COMMITTED, ("kd",), train_ort.read_sidecar(sidecar_path))
    on_path = {n.output[0] for n in gradient_path(j)}  # by output: protobuf wrappers have no stable id()
    model = j.model
    node = next(n for n in model.graph.node
                if n.op_type == "Relu" and n.output[0] in on_path and not n.name.startswith(("teacher/", "kd/")))
    node.op_type = "Softplus"
    onnx.save(model, str(model_path))
    sidecar["model_hash"] = train_ort.content_hash(model_path.read_bytes())
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    train_ort.read_sidecar(sidecar_path)  # the hash check passes: what fails next is ORT
    return node.name


def test_a_training_run_prints_no_ort_log(joint_kd, tmp_path):
    """Two steps on the unmodified graph: exit 0, nothing on stderr (no ORT INFO or WARNING line)."""
    sidecar = copy_joint(joint_kd, tmp_path / "good")
    result = run_cli(sidecar, tmp_path / "work")
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", f"stderr of a run that trains:\n{result.stderr}"
    assert "trained student:" in result.stdout, result.stdout


def test_an_ort_failure_is_one_line(joint_kd, tmp_path):
    """ORT Training cannot differentiate Softplus: one line naming the graph, the op and the node, exit 1."""
    sidecar = copy_joint(joint_kd, tmp_path / "softplus")
    node = softplus_instead_of_relu(sidecar)
    model_path = sidecar.parent / json.loads(sidecar.read_text())["model"]
    result = run_cli(sidecar, tmp_path / "work")
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}:\n{output}"
    lines = output.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines of output, expected one:\n{output}"
    line = lines[0]
    assert result.stderr.strip() == line, f"the error goes to stderr:\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    prefix = f"error: ORT Training failed on {model_path}: "
    assert line.startswith(prefix), f"expected {prefix!r}...\ngot {line!r}"
    assert "Softplus" in line and node in line, f"the line names neither the op nor the node `{node}`: {line!r}"
    for noise in ("onnxruntime_src", "Traceback", "onnxruntime::", "[I:onnxruntime", "[E:onnxruntime"):
        assert noise not in line, f"{noise!r} in {line!r}"


# What ORT Training 1.19.2 raised on the graphs of issue 9 (first line of str(exc)), and the line
# train_ort prints for each.
ORT_MESSAGES = {
    "no-gradient-builder": (
        "/onnxruntime_src/orttraining/orttraining/core/graph/gradient_builder_registry.cc:29 "
        "onnxruntime::training::GradientDef onnxruntime::training::GetGradientForOp(const GradientGraphConfiguration&, "
        "onnxruntime::Graph*, const onnxruntime::Node*, const std::unordered_set<std::__cxx11::basic_string<char> >&, "
        "const std::unordered_set<std::__cxx11::basic_string<char> >&, const onnxruntime::logging::Logger&, "
        "std::unordered_set<std::__cxx11::basic_string<char> >&, std::unordered_map<std::__cxx11::basic_string<char>, "
        "std::vector<long int> >&) gradient_builder != nullptr was false. The gradient builder has not been registered: "
        "HardSwish for node /features/features.0/features.0.2/HardSwish\n",
        "The gradient builder has not been registered: HardSwish for node /features/features.0/features.0.2/HardSwish",
    ),
    "enforce-without-message": (
        "/onnxruntime_src/orttraining/orttraining/core/graph/gradient_builder_base.h:123 "
        "onnxruntime::training::ArgDef onnxruntime::training::GradientBuilderBase::O(size_t, bool) const "
        "i < node_->OutputDefs().size() was false. \n",
        "GradientBuilderBase::O: i < node_->OutputDefs().size() was false",
    ),
    "status-of-a-kernel": (
        "/onnxruntime_src/orttraining/orttraining/training_api/module.cc:632 onnxruntime::common::Status "
        "onnxruntime::training::api::Module::TrainStep(const std::vector<OrtValue>&, std::vector<OrtValue>&) "
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Expand node. "
        "Name:'/ReduceMean_Grad/Expand_5' Status Message: invalid expand shape",
        "Non-zero status code returned while running Expand node. Name:'/ReduceMean_Grad/Expand_5' "
        "Status Message: invalid expand shape",
    ),
    "plain": ("something else went wrong\nsecond line", "something else went wrong"),
}


@pytest.mark.parametrize("case", sorted(ORT_MESSAGES))
def test_ort_error_line(case):
    message, expected = ORT_MESSAGES[case]
    assert train_ort.ort_error_line(RuntimeError(message)) == expected
