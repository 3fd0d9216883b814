"""torchvision densenet121 as a teacher (issue 10.8): the TorchScript exporter reads its equal
BatchNorm parameters through Identity nodes; kdgraph takes them for the constants they are,
folds them, and merges (it refused with 'parameters that are not float constants')."""

from __future__ import annotations

import subprocess

import onnx
import torch
import torchvision

import exports


def test_densenet121_teacher_merges(kdgraph_bin, tmp_path):
    path = tmp_path / "densenet121.onnx"
    torch.onnx.export(torchvision.models.densenet121().eval(), (torch.randn(2, 3, 64, 64),), str(path),
                      dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    graph = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    via_identity = [n for n in graph.node if n.op_type == "BatchNormalization"
                    and any(producers.get(i) == "Identity" for i in n.input[1:])]
    assert via_identity, "the export no longer reads BN parameters through Identity: the test lost its point"
    out = tmp_path / "joint.onnx"
    run = subprocess.run([str(kdgraph_bin), "merge", str(path), str(exports.export("resnet18", "ts-train")),
                          "-m", "at", "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "loss/at" in run.stdout
    joint = onnx.load(str(out)).graph
    assert not [n for n in joint.node if n.op_type == "BatchNormalization" and n.name.startswith("teacher/")]
