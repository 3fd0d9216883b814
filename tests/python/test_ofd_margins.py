"""OFD's margins (issue 10.1): with a teacher exported keeping its BatchNorms they equal clovaai's
get_margin_from_BN; with a folded teacher the report says each stage uses a batch estimate and
warns with the export that fixes it."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import onnx
import torch
import torchvision
from onnx import numpy_helper

import exports

SIZE = 64


def clovaai_margin(bn: torch.nn.BatchNorm2d) -> np.ndarray:
    """get_margin_from_BN of clovaai/overhaul-distillation, written from its formula."""
    def cdf(x):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    margins = []
    for s, m in zip(bn.weight.detach().double().tolist(), bn.bias.detach().double().tolist()):
        s = abs(s)
        if cdf(-m / s) > 0.001:
            margins.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            margins.append(-3 * s)
    return np.array(margins)


def test_margins_from_a_teacher_that_keeps_its_batchnorms(kdgraph_bin, tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18().eval()
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # trained-looking scales and shifts
            module.weight.data.uniform_(0.2, 1.5)
            module.bias.data.normal_(0.0, 0.7)
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(teacher, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=True, optimize=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("N")}})
    student = exports.export("resnet18", "ts-train")
    out = tmp_path / "joint.onnx"
    run = subprocess.run([str(kdgraph_bin), "merge", str(path), str(student), "-m", "ofd", "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "batch estimate" not in run.stdout, run.stdout
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    sidecar = json.loads(out.with_suffix(".json").read_text())
    stages = [p["stage"] for p in sidecar["pairs"]]
    assert len(stages) == 4
    for stage, layer in zip(stages, (teacher.layer1, teacher.layer2, teacher.layer3, teacher.layer4)):
        got = inits[f"kd/ofd/{stage}/margin"].reshape(-1)
        want = clovaai_margin(layer[-1].bn2)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=stage)
        assert any(f"ofd {stage}: margins from the teacher's BatchNorm" in n for n in sidecar["notes"])


def test_a_folded_teacher_is_reported_as_a_batch_estimate(kdgraph_bin):
    teacher = exports.export("resnet18", "ts-eval")
    student = exports.export("resnet18", "ts-train")
    plan = json.loads(subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "ofd",
                                      "--dry-run", "--json"], check=True, capture_output=True, text=True).stdout)
    notes = [n for n in plan["notes"] if n.startswith("ofd ")]
    assert len(notes) == 4 and all("margins are a batch estimate" in n for n in notes), notes
    warning = next(w for w in plan["warnings"] if w.startswith("ofd:"))
    assert "4 of 4 stages" in warning and "optimize=False" in warning, warning
