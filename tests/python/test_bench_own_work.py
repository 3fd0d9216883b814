"""bench/own_work.py cuts a stage graph's own work (kdgraph's connectors and loss) out faithfully.

bench/ort_step.py adds that cut graph's step to its floor, so the cut must hold exactly the work
kdgraph inserted: fed the student's and teacher's tensors that the joint graph computes, it gives
the joint graph's loss, and it holds none of the student's or teacher's nodes.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import train_ort
from merge_checks import run_with_taps

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import own_work  # noqa: E402

TEACHER, STUDENT = ("resnet56", "eval"), ("resnet20", "train")


def stage_graphs(joint_path):
    """[(model, sidecar)] of every stage graph of a merge (init stage first)."""
    main = train_ort.read_sidecar(joint_path)
    graphs = []
    for spec in main["stages"]:
        sidecar = train_ort.read_sidecar(Path(joint_path).parent / spec["sidecar"])
        graphs.append((onnx.load(sidecar["model_path"]), sidecar))
    return graphs


@pytest.mark.parametrize("method", ["vid", "ofd", "ft", "at"])
def test_cut_graph_gives_the_joint_loss(merge, method):
    rng = np.random.default_rng(0)
    batch = 4
    feeds = {"input": rng.standard_normal((batch, 3, 32, 32), dtype=np.float32),
             "labels": rng.integers(0, 100, batch).astype(np.int64)}
    for model, sidecar in stage_graphs(merge(TEACHER, STUDENT, method)):
        cut, cut_sidecar = own_work.own_graph(model, sidecar, batch)
        produced = {o for n in model.graph.node for o in n.output}
        values = {i.name: i for i in cut.graph.initializer}
        student = {name[len("own/"):-len("/value")] for name in values if name.startswith("own/") and name.endswith("/value")}
        teacher = {name for name in values if name in produced}
        assert bool(student) == own_work.holds_student(model), sidecar["model"]
        assert bool(teacher) == own_work.holds_teacher(model), sidecar["model"]
        assert all(own_work.is_own(n) or n.name.startswith("own/") for n in cut.graph.node)
        assert set(cut_sidecar["requires_grad"]) <= set(values)
        joint = run_with_taps(model, ["loss", *sorted(student | teacher)], feeds)
        for name in student:
            values[f"own/{name}/value"].CopyFrom(numpy_helper.from_array(joint[name], f"own/{name}/value"))
        for name in teacher:
            values[name].CopyFrom(numpy_helper.from_array(joint[name], name))
        loss = run_with_taps(cut, ["loss"], feeds)["loss"]
        np.testing.assert_allclose(loss, joint["loss"], rtol=1e-5, err_msg=f"{method}: {sidecar['model']}")


@pytest.mark.parametrize("method", ["fitnet", "kd", "ft"])
def test_teacher_part_is_the_teacher_as_far_as_the_stage_reads_it(merge, method):
    """The floor's teacher forward pass computes the teacher's tensors the stage reads, as the stage
    graph does, with the stage graph's teacher nodes (FitNet's, cut at its hint in the middle)."""
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((2, 3, 32, 32), dtype=np.float32)}
    for model, sidecar in stage_graphs(merge(TEACHER, STUDENT, method)):
        if not own_work.holds_teacher(model):
            continue
        part = own_work.teacher_part(model)
        read = own_work.teacher_boundary(model)
        assert read and [o.name for o in part.graph.output] == read
        assert all(n.name.startswith(own_work.TEACHER_PREFIX) for n in part.graph.node)
        joint = run_with_taps(model, read, {**feeds, "labels": np.zeros(2, np.int64)})
        alone = run_with_taps(part, read, feeds)
        for name in read:
            np.testing.assert_array_equal(alone[name], joint[name], err_msg=f"{method}: {name}")
        # merge prunes the teacher to what the stage reads, so the part is all of the stage's teacher
        teacher_nodes = sum(n.name.startswith(own_work.TEACHER_PREFIX) for n in model.graph.node)
        assert len(part.graph.node) == teacher_nodes, sidecar["model"]
