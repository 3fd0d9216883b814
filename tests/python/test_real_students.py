"""Issue 9, "Every student that merges also trains": real torchvision students, exported in
training mode, merged with a resnet18 teacher and trained with ORT Training.

Students (students.py): mobilenet_v3_small (HardSwish, HardSigmoid, Dropout), shufflenet_v2_x1_0
(ReduceMean head without keepdims), convnext_tiny (LayerNormalization, stochastic depth) with
`-m kd -m at`, and a small VisionTransformer (LayerNormalization, attention) with `-m kd`, each
exported by the TorchScript exporter in training mode and by torch.export with its defaults, at
64x64 (by default each student in one of the two, DEFAULT_CASES; KDGRAPH_HEAVY=1: both).
Teacher: resnet18, eval export (exports.py, cached). Per student and export:

  - kdgraph merge succeeds; for each op form of the student file that ORT Training 1.19 cannot
    differentiate (REWRITTEN_FORMS), a sidecar note says it was rewritten (a line with "rewrote"
    and the op) and no student node of that form is left in the joint graph;
  - TRAIN_STEPS ORT Training steps (train_ort's API) on one fixed batch: the loss falls, the
    student's first conv changes, the teacher stays bit-identical (training and eval models,
    checkpoint), and the student exported with export_model_for_inferencing runs in onnxruntime
    and gives the trained module's eval-mode logits (merge_checks.check_ort_training);
  - a student that drops out in training (Dropout with a non-zero ratio, stochastic depth) still
    does in the joint graph (training-mode passes on one batch differ) and does not in eval mode
    (two eval-mode passes are equal; checked first, as the export comparison fails otherwise too).

test_attributes_keep_their_values: every attribute of every joint graph carries its value in
the file (merge_checks.attributes_without_value), zeros included.
"""

from __future__ import annotations

from typing import Dict, List, Set

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import exports
import students
import train_ort
from heavy import HEAVY, cases
from merge_checks import Joint, attributes_without_value, check_ort_training, first_student_conv_weight, says_rewritten

CNNS = ("mobilenet_v3_small", "shufflenet_v2_x1_0", "convnext_tiny")
ALL_CASES = [(name, mode) for name in CNNS + ("vit",) for mode in students.MODES]
# By default every student once, both exporters among them (the rewritten forms do not depend on
# the exporter); KDGRAPH_HEAVY=1 runs each student in both export forms.
DEFAULT_CASES = [(name, "ts-train") for name in CNNS] + [("vit", "dynamo-train")]
CASES = ALL_CASES if HEAVY else DEFAULT_CASES
METHODS = {"vit": ("kd",)}
DEFAULT_METHODS = ("kd", "at")
TRAIN_STEPS = 10
BATCH = 4


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# Op forms that ORT Training 1.19 cannot differentiate and that kdgraph rewrites: the op a note
# names -> whether a node is of that form.
REWRITTEN_FORMS = {
    "HardSwish": lambda n: n.op_type == "HardSwish",
    "HardSigmoid": lambda n: n.op_type == "HardSigmoid",
    "LayerNormalization": lambda n: n.op_type == "LayerNormalization",
    "CastLike": lambda n: n.op_type == "CastLike",
    "Split": lambda n: n.op_type == "Split" and _attr(n, "axis") is None,
    # shufflenet's head x.mean([2, 3]): ReduceMean_Grad's Expand fails without keepdims
    "ReduceMean": lambda n: n.op_type == "ReduceMean" and _attr(n, "keepdims", 1) == 0,
}


def forms_in(nodes) -> Set[str]:
    return {form for n in nodes for form, is_form in REWRITTEN_FORMS.items() if is_form(n)}


def drops_out(model: onnx.ModelProto) -> bool:
    """Whether the export drops in training: a RandomUniformLike (torch.export's dropout and either
    exporter's stochastic depth) or a Dropout whose ratio is not 0."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in model.graph.node:
        if n.op_type == "RandomUniformLike":
            return True
        if n.op_type == "Dropout":
            ratio = constants.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            if ratio is None or float(ratio) != 0.0:
                return True
    return False


@pytest.fixture(scope="module")
def teacher_path():
    return exports.export(*students.TEACHER)


def student_export(name: str, mode: str):
    try:
        return students.export(name, mode)
    except exports.ExportFailed as exc:
        pytest.xfail(str(exc))


@pytest.mark.parametrize("name,mode", cases(ALL_CASES, DEFAULT_CASES.__contains__, "-".join))
def test_student_trains(name, mode, teacher_path, merge, tmp_path):
    student_path = student_export(name, mode)
    methods = METHODS.get(name, DEFAULT_METHODS)
    where = f"{name} ({mode}, {'+'.join(methods)})"
    path = merge(teacher_path, student_path, list(methods))
    j = Joint(path, f"resnet18-{name}-{mode}", methods, train_ort.read_sidecar(path))

    # The rewrites: noted, and done.
    student_model = onnx.load(str(student_path))
    present = forms_in(student_model.graph.node)
    notes = j.sidecar.get("notes", [])
    unnoted = sorted(f for f in present if not any(says_rewritten(line, f) for line in notes))
    assert not unnoted, f"{where}: the student has {sorted(present)}; no sidecar note says these were rewritten: {unnoted}; notes: {notes}"
    left = sorted(forms_in(n for n in j.model.graph.node if not n.name.startswith(("teacher/", "kd/"))))
    assert not left, f"{where}: student nodes still of a form ORT Training cannot differentiate: {left}"

    # ORT Training.
    feeds = {
        "input": students.input_batch(BATCH, seed=1),
        "labels": np.random.RandomState(7).randint(0, students.NUM_CLASSES, BATCH).astype(np.int64),
    }
    workdir = train_ort.generate(j.sidecar, tmp_path / "artifacts")
    dropout = drops_out(student_model)
    if dropout:
        probe = train_ort.Stage(j.sidecar, workdir, generated=True)
        evals = [probe.evaluate(feeds)[j.student_outputs[0]] for _ in range(2)]
        del probe
        assert np.array_equal(evals[0], evals[1]), (
            f"{where}: two eval-mode passes on one batch differ (max |diff| {np.abs(evals[0] - evals[1]).max():.3g}): "
            f"the student's dropout or stochastic depth still draws in eval mode, and in the exported student"
        )
    stage = check_ort_training(j, workdir, feeds, tmp_path, first_student_conv_weight(j), steps=TRAIN_STEPS)

    if dropout:
        logits = [stage.forward_backward(feeds)[j.student_outputs[0]] for _ in range(3)]
        assert any(not np.array_equal(logits[0], other) for other in logits[1:]), (
            f"{where}: the student drops out in training, yet three training-mode passes give the same logits"
        )


def test_attributes_keep_their_values(teacher_path, merge):
    """Every joint graph of CASES writes each attribute's value, zeros included (one test for all:
    the fault is the writer's, not a student's)."""
    problems, merged = [], 0
    for name, mode in CASES:
        student_path = students.export(name, mode)
        try:
            path = merge(teacher_path, student_path, list(METHODS.get(name, DEFAULT_METHODS)))
        except AssertionError:
            continue  # a merge that fails is test_student_trains' finding
        merged += 1
        missing = attributes_without_value(onnx.load(str(path), load_external_data=False))
        if missing:
            problems.append(f"{name} ({mode}): {len(missing)} attributes without their value, e.g. {missing[:4]}")
    assert merged, "no student merged"
    assert not problems, "attributes written without their value (proto2 needs i=0 written):\n  " + "\n  ".join(problems)
