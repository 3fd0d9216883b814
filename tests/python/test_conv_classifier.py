"""A classifier that is a 1x1 convolution followed by global pooling (torchvision squeezenet1_1,
issue 10.5) is a classifier: the embedding is the map it reads, and embedding methods compare
that map averaged over space, as a linear classifier's input would be."""

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


def export_squeezenet(path):
    model = torchvision.models.squeezenet1_1(num_classes=1000).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)


def test_squeezenet_teacher_embedding_and_rkd(kdgraph_bin, tmp_path):
    teacher = tmp_path / "squeezenet.onnx"
    export_squeezenet(teacher)
    info = json.loads(subprocess.run([str(kdgraph_bin), "inspect", str(teacher), "--json"],
                                     check=True, capture_output=True, text=True).stdout)
    graph = onnx.load(str(teacher)).graph
    last_conv = [n for n in graph.node if n.op_type == "Conv"][-1]
    assert info["embedding"]["tensor"] == last_conv.input[0], info["embedding"]
    assert info["embedding"]["shape"][1] == 512, info["embedding"]
    assert any("1x1 convolution" in n for n in info["notes"]), info["notes"]

    student = exports.export("resnet18", "ts-train")
    out = tmp_path / "joint.onnx"
    subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "kd", "-m", "rkd",
                    "-o", str(out)], check=True, capture_output=True)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    pair = next(p for p in sidecar["pairs"] if p["method"] == "rkd")
    s_name, t_name = pair["student"]["tensor"], "teacher/" + pair["teacher"]["tensor"]
    x = np.random.RandomState(0).standard_normal((6, 3, SIZE, SIZE)).astype(np.float32)
    values = run_with_taps(onnx.load(str(out)), [s_name, t_name],
                           {sidecar["inputs"][0]["name"]: x, "labels": np.zeros(6, np.int64)})
    e_t = torch.from_numpy(values[t_name]).double().mean(dim=(2, 3))
    e_s = torch.from_numpy(values[s_name]).double()
    want = R.rkd(e_s, e_t)[0].item()
    got = float(values["loss/rkd"])
    assert abs(got - want) <= 1e-4 * abs(want), f"loss/rkd {got} vs reference {want}"
