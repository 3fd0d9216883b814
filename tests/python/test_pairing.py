"""--pairing (issue 10.3): by position (the default, RepDistiller's where the counts agree; the
deepest maps of each model where they do not) or by resolution; the report names the rule and
every unpaired map, and the loss is the reference's on the pairs chosen."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import torch

import kd_reference as R
from conftest import fixture_path
from merge_checks import run_with_taps


def plan(kdgraph_bin, teacher, student, *extra):
    return json.loads(subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "at",
                                      "--dry-run", "--json", *extra],
                                     check=True, capture_output=True, text=True).stdout)


def test_pairing_by_position_and_by_resolution(kdgraph_bin, tmp_path):
    # vgg13_bn's stage ends are 16, 8, 4 and 2 pixels wide at 32x32; resnet20's 32, 16 and 8.
    teacher, student = fixture_path("vgg13_bn", "eval"), fixture_path("resnet20", "eval")
    by_position = plan(kdgraph_bin, teacher, student)
    assert by_position["pairing"] == "position"
    sizes = [(p["teacher"]["shape"][2], p["student"]["shape"][2]) for p in by_position["pairs"]]
    assert sizes == [(8, 32), (4, 16), (2, 8)], sizes
    assert any("leaves stage1 [N, 128, 16, 16]" in n for n in by_position["notes"]), by_position["notes"]

    by_resolution = plan(kdgraph_bin, teacher, student, "--pairing", "resolution")
    assert by_resolution["pairing"] == "resolution"
    sizes = [(p["teacher"]["shape"][2], p["student"]["shape"][2]) for p in by_resolution["pairs"]]
    assert sizes == [(16, 16), (8, 8)], sizes
    assert all(p["pool"] is None for p in by_resolution["pairs"])
    notes = " ".join(by_resolution["notes"])
    assert "teacher" in notes and "[N, 512, 4, 4]" in notes and "[N, 512, 2, 2]" in notes, notes
    assert "student" in notes and "[N, 16, 32, 32]" in notes, notes

    out = tmp_path / "joint.onnx"
    subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "at", "--pairing", "resolution",
                    "-o", str(out)], check=True, capture_output=True)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    names = [(p["student"]["tensor"], "teacher/" + p["teacher"]["tensor"]) for p in sidecar["pairs"]]
    x = np.random.RandomState(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    values = run_with_taps(onnx.load(str(out)), [n for pair in names for n in pair],
                           {"input": x, "labels": np.zeros(4, np.int64)})
    want = R.at([(torch.from_numpy(values[s]).double(), torch.from_numpy(values[t]).double())
                 for s, t in names]).item()
    assert abs(float(values["loss/at"]) - want) <= 1e-4 * abs(want)


def test_pairs_are_labelled_by_both_models_stages_and_modules(kdgraph_bin):
    # Issue 10.7: a label may not mix the two models' numbering silently.
    teacher, student = fixture_path("vgg13_bn", "eval"), fixture_path("resnet20", "eval")
    pairs = plan(kdgraph_bin, teacher, student)["pairs"]
    first = pairs[0]
    assert (first["teacher_stage"], first["student_stage"]) == ("stage2", "stage1"), first
    assert first["stage"] == "stage2_stage1", first
    assert first["student_module"] == "layer1.2", first
    text = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "-m", "at", "--dry-run"],
                          check=True, capture_output=True, text=True).stdout
    assert "(stage1, module layer1.2)" in text and "(stage2, module " in text, text
    # Where both models call their maps alike, the label is that name.
    same = plan(kdgraph_bin, fixture_path("resnet56", "eval"), student)["pairs"]
    assert [p["stage"] for p in same] == ["stage1", "stage2", "stage3"]
