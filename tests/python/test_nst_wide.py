"""NST on a wide teacher (issue 10.9): torchvision resnet50 -> resnet18 at 64x64.

The loss is a difference of three means of squared kernels; over a B x 2048 x 2048 kernel a
float32 reduction loses low-order bits, and the difference amplifies them. kdgraph reduces per
sample in the cheaper of two equal forms; the judge here is RepDistiller's formula in float64
on the very tap tensors the joint graph computes.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import torch

import exports
import kd_reference as R
from merge_checks import run_with_taps


def test_nst_on_a_wide_teacher_matches_float64(kdgraph_bin, tmp_path):
    teacher = exports.export("resnet50", "ts-eval")
    student = exports.export("resnet18", "ts-train")
    out = tmp_path / "joint.onnx"
    subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "nst",
                    "--no-check", "-o", str(out)], check=True, capture_output=True)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    pairs = [(p["student"]["tensor"], "teacher/" + p["teacher"]["tensor"]) for p in sidecar["pairs"]]
    assert any(p["teacher"]["shape"][1] == 2048 for p in sidecar["pairs"]), "the wide stage is paired"
    x = exports.input_batch("resnet18", batch=8, seed=3).astype(np.float32)
    feeds = {sidecar["inputs"][0]["name"]: x, "labels": np.zeros(8, np.int64)}
    values = run_with_taps(onnx.load(str(out)), [n for pair in pairs for n in pair], feeds)
    want = R.nst([(torch.from_numpy(values[s]).double(), torch.from_numpy(values[t]).double())
                  for s, t in pairs]).item()
    got = float(values["loss/nst"])
    assert abs(got - want) <= 1e-4 * abs(want), f"loss/nst {got} vs float64 reference {want}"
