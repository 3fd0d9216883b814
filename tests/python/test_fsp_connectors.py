"""FSP between models of different widths (issue 10.10): refused without --fsp-connectors, naming
it; with it, a 1x1 conv + BN maps each student map to the teacher's channels, the init stage's
term equals the reference FSP on the connected maps, and the init stage trains.

The pair: wrn_40_2 (16, 32, 64, 128 channels) -> resnet20 (16, 16, 32, 64): the stems match, the
three stage ends need connectors."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import torch

import kd_reference as R
import train_ort
from conftest import FIXTURES, fixture_path, mf
from merge_checks import run_with_taps


def test_fsp_connectors_across_widths(kdgraph_bin, tmp_path):
    teacher = fixture_path("wrn_40_2", "eval")
    student = FIXTURES / "resnet20.onnx"
    refused = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "fsp",
                              "-o", str(tmp_path / "no.onnx")], capture_output=True, text=True)
    assert refused.returncode == 1 and "--fsp-connectors" in refused.stderr, refused.stderr
    assert not list(tmp_path.glob("no*"))

    out = tmp_path / "joint.onnx"
    subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "fsp", "--fsp-connectors",
                    "-o", str(out)], check=True, capture_output=True)
    init = out.with_suffix(".init.onnx")
    sidecar = json.loads(init.with_suffix(".json").read_text())
    assert sidecar["hyper"]["fsp"] == {"connectors": True}
    pairs = sidecar["pairs"]
    connected = [p for p in pairs if p["connector"]]
    assert len(connected) == 3 and all("conv1x1" in p["connector"] for p in connected), pairs

    def student_tap(p):
        return f"kd/fsp/{p['stage']}/connector/bn1" if p["connector"] else p["student"]["tensor"]

    # One connector per student map, though each inner map enters two flow matrices (a second
    # ctx.tap once gave it a second, independently trained connector).
    init_model = onnx.load(str(init))
    connector_convs = [n.name for n in init_model.graph.node if n.op_type == "Conv" and "/connector/" in n.name]
    assert sorted(connector_convs) == sorted(f"kd/fsp/{p['stage']}/connector/conv0" for p in connected), connector_convs

    names = [student_tap(p) for p in pairs] + ["teacher/" + p["teacher"]["tensor"] for p in pairs]
    x = np.random.RandomState(2).standard_normal((4, *mf.INPUT_SHAPE)).astype(np.float32)
    values = run_with_taps(init_model, names, {sidecar["inputs"][0]["name"]: x})
    as_torch = lambda n: torch.from_numpy(values[n]).double()
    want = R.fsp([as_torch(student_tap(p)) for p in pairs],
                 [as_torch("teacher/" + p["teacher"]["tensor"]) for p in pairs]).item()
    got = float(values["loss/fsp"])
    assert abs(got - want) <= 1e-4 * abs(want), f"loss/fsp {got} vs reference {want}"

    result = train_ort.train(out.with_suffix(".json"), steps=1, init_steps=10, batch=4,
                             workdir=tmp_path / "work", log=lambda *a, **k: None)
    history = [float(r.outputs["loss/fsp"]) for r in result.histories["init"]]
    assert history[-1] < history[0], history
