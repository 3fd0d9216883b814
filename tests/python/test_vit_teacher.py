"""A vision transformer teacher with a CNN student (issue 10.6): its logits and its class-token
embedding are found, so KD and the embedding methods work; a method that needs stage ends is
refused with a message that names the model and says why."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import torch
import torchvision

import exports
import kd_reference as R
from merge_checks import run_with_taps

SIZE = 64


def export_vit(path):
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128).eval()
    torch.onnx.export(model, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17)


def test_vit_teacher(kdgraph_bin, tmp_path):
    teacher = tmp_path / "vit.onnx"
    export_vit(teacher)
    student = exports.export("resnet18", "ts-train")
    out = tmp_path / "joint.onnx"
    run = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "kd", "-m", "rkd",
                          "-m", "pkt", "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    # The embedding is the class token the head reads.
    head = [n for n in onnx.load(str(teacher)).graph.node if n.op_type == "Gemm"][-1]
    rkd = next(p for p in sidecar["pairs"] if p["method"] == "rkd")
    assert rkd["teacher"]["tensor"] == head.input[0], rkd["teacher"]
    x = np.random.RandomState(1).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    values = run_with_taps(onnx.load(str(out)), ["teacher/logits"],
                           {sidecar["inputs"][0]["name"]: x, "labels": np.zeros(4, np.int64)})
    student_logits = next(o["name"] for o in sidecar["outputs"] if o["role"] == "student")
    want = R.kd(torch.from_numpy(values[student_logits]).double(),
                torch.from_numpy(values["teacher/logits"]).double()).item()
    assert abs(float(values["loss/kd"]) - want) <= 1e-4 * abs(want)

    refused = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "at",
                              "-o", str(tmp_path / "at.onnx")], capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stdout == ""
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("error: "), line
    for part in ("teacher", "vit.onnx", "no spatial map after its stem", "kd, cc, rkd, pkt, crd"):
        assert part in line, line
    assert not (tmp_path / "at.onnx").exists()
