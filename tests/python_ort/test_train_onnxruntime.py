"""examples/train_onnxruntime.py on stock onnxruntime (its CPU path: the IOBinding loop with two
swapped buffer sets) against `kdgraph train` on tract: the same batches, the same losses, a
checkpoint `kdgraph train --resume` continues; CRD fed the same memories, sample indices and
contrast indices by both; and kdgraph train's exported student on stock onnxruntime."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_onnxruntime.py"
BATCH, SAMPLES, STEPS, LR = 4, 16, 8, "1e-4"
LOSS_RTOL = 1e-3  # two float32 runtimes over 8 AdamW steps (measured: <= 1e-4)


def merge(kdgraph_bin, out, *methods):
    subprocess.run([str(kdgraph_bin), "merge", str(ROOT / "fixtures" / "resnet56.onnx"),
                    str(ROOT / "fixtures" / "resnet20.onnx"), *methods, "--emit", "step", "-o", str(out)],
                   check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def joint(kdgraph_bin, tmp_path_factory):
    return merge(kdgraph_bin, tmp_path_factory.mktemp("joint") / "joint.onnx", "-m", "kd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, x=rng.standard_normal((SAMPLES, 3, 32, 32)).astype(np.float32), y=rng.integers(0, 100, SAMPLES))
    return path


def common(joint, data, out, steps):
    return [str(joint.with_suffix(".json")), "--data", str(data), "--batch", str(BATCH), "--steps", str(steps),
            "--lr", LR, "-o", str(out / "student.onnx"), "--log", str(out / "log.jsonl")]


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def tract_run(kdgraph_bin, joint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tract")
    run([str(kdgraph_bin), "train", *common(joint, data, out, STEPS)])
    return out


@pytest.fixture(scope="module")
def onnxruntime_run(joint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnxruntime")
    run([sys.executable, str(EXAMPLE), *common(joint, data, out, STEPS)])
    return out


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_example_draws_the_same_batches_and_gives_the_same_losses(tract_run, onnxruntime_run):
    ours, theirs = read_log(tract_run / "log.jsonl"), read_log(onnxruntime_run / "log.jsonl")
    assert [line["indices"] for line in theirs] == [line["indices"] for line in ours]
    assert len(theirs) == STEPS
    for a, b in zip(theirs, ours):
        for name in ("loss", "loss/ce", "loss/kd"):
            assert a[name] == pytest.approx(b[name], rel=LOSS_RTOL), f"step {a['step']}: {name}"


def test_example_writes_a_student_and_a_checkpoint_kdgraph_resumes(kdgraph_bin, joint, data, onnxruntime_run, tmp_path):
    student = onnx.load(str(onnxruntime_run / "student.onnx"))
    assert [i.name for i in student.graph.input] == ["input"]
    assert [o.name for o in student.graph.output] == ["logits"]
    with np.load(onnxruntime_run / "student.ckpt.npz") as saved:
        assert int(saved["kdgraph:step"]) == STEPS
        trained = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
        np.testing.assert_array_equal(trained["conv1.weight"], saved["conv1.weight"])
    result = run([str(kdgraph_bin), "train", *common(joint, data, tmp_path, STEPS + 1),
                  "--resume", str(onnxruntime_run / "student.ckpt.npz")])
    assert "1 steps trained" in result.stdout


def test_kdgraph_students_run_on_stock_onnxruntime(tract_run, onnxruntime_run, data):
    """Both trainers' students run here; trained alike, their logits agree closely."""
    with np.load(data) as arrays:
        x = arrays["x"][:BATCH]
    logits = [ort.InferenceSession(str(folder / "student.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
              for folder in (tract_run, onnxruntime_run)]
    assert np.all(np.isfinite(logits[0]))
    assert np.linalg.norm(logits[0] - logits[1]) <= 1e-2 * np.linalg.norm(logits[1])


def test_no_shuffle_takes_the_batches_in_file_order_in_both_trainers(kdgraph_bin, joint, data, tmp_path):
    """--no-shuffle: every epoch the file's batches in order (1.5 epochs here), in both trainers."""
    steps = SAMPLES // BATCH * 3 // 2
    logs = []
    for name, cmd in (("tract", [str(kdgraph_bin), "train"]), ("onnxruntime", [sys.executable, str(EXAMPLE)])):
        out = tmp_path / name
        out.mkdir()
        run([*cmd, *common(joint, data, out, steps), "--no-shuffle"])
        logs.append(read_log(out / "log.jsonl"))
    in_order = [[(s * BATCH + i) % SAMPLES for i in range(BATCH)] for s in range(steps)]
    for log in logs:
        assert [line["indices"] for line in log] == in_order
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"step {a['step']}"


# --------------------------------------------------------------------------- CRD


def example_module():
    spec = importlib.util.spec_from_file_location("train_onnxruntime", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def views_of(data, path):
    """Two views of each sample of `data` in a shuffled order, each row's sample in `id`."""
    with np.load(data) as plain:
        order = np.random.default_rng(1).permutation(2 * SAMPLES)
        np.savez(path, x=np.concatenate([plain["x"]] * 2)[order], y=np.concatenate([plain["y"]] * 2)[order],
                 id=np.concatenate([np.arange(SAMPLES)] * 2)[order])
    return path


@pytest.mark.parametrize("layout", ["rows", "views"])
def test_example_feeds_crd_what_kdgraph_train_feeds(kdgraph_bin, data, tmp_path, layout):
    """Two epochs of CRD (K = 5 negatives) in both trainers: the same losses at every step, and the
    same memory banks and Z at the end, which follow from the memories' first values, the sample
    indices and the contrast indices only if the two draw them alike; "views": a file of two views
    of each sample, whose `id` array names the memory row of each."""
    if layout == "views":
        data = views_of(data, tmp_path / "views.npz")
    crd = merge(kdgraph_bin, tmp_path / "crd.onnx", "-m", "crd", "--crd-n-data", str(SAMPLES), "--crd-negatives", "5")
    runs = {}
    for name, trainer in (("tract", [str(kdgraph_bin), "train"]), ("onnxruntime", [sys.executable, str(EXAMPLE)])):
        (tmp_path / name).mkdir()
        run([*trainer, *common(crd, data, tmp_path / name, STEPS)])
        runs[name] = read_log(tmp_path / name / "log.jsonl")
    for a, b in zip(runs["onnxruntime"], runs["tract"]):
        assert a["indices"] == b["indices"]
        for name in ("loss", "loss/ce", "loss/crd"):
            assert a[name] == pytest.approx(b[name], rel=LOSS_RTOL), f"step {a['step']}: {name}"
    with np.load(tmp_path / "tract" / "student.ckpt.npz") as ours, np.load(tmp_path / "onnxruntime" / "student.ckpt.npz") as theirs:
        for name in ("kd/crd/memory_student", "kd/crd/memory_teacher", "kd/crd/z"):
            assert np.linalg.norm(theirs[name] - ours[name]) <= LOSS_RTOL * np.linalg.norm(ours[name]), name


def test_contrast_indices_are_the_sample_then_negatives_of_other_classes():
    """The draw itself: column 0 the sample; K distinct samples of other classes where there are
    K of them, else every one of them drawn with replacement; the same draw for the same seed and
    step, another for another step."""
    crd = example_module().Crd(n_data=12, negatives=4, feat_dim=128, seed=3)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    indices = [0, 4, 6, 11]
    drawn = crd.contrast_index(y, indices, step=1)
    assert drawn.shape == (4, 5) and drawn.dtype == np.int64
    for row, sample in zip(drawn, indices):
        assert row[0] == sample
        assert len(set(row[1:])) == 4 and np.all(y[row[1:]] != y[sample]), row
    np.testing.assert_array_equal(crd.contrast_index(y, indices, step=1), drawn)
    assert not np.array_equal(crd.contrast_index(y, indices, step=2), drawn)
    few = example_module().Crd(n_data=12, negatives=8, feat_dim=128, seed=3).contrast_index(y, [6], step=1)
    assert np.all(y[few[0, 1:]] != 2) and len(few[0]) == 9  # 6 samples of other classes, 8 drawn
    memories = crd.initial_state()
    bound = 1 / np.sqrt(128 / 3)
    for name in ("kd/crd/memory_student", "kd/crd/memory_teacher"):
        assert memories[name].shape == (12, 128) and np.all(np.abs(memories[name]) <= bound)
        assert abs(float(memories[name].mean())) < 0.02 and float(memories[name].std()) == pytest.approx(bound / np.sqrt(3), rel=0.05)
    np.testing.assert_array_equal(memories["kd/crd/z"], [-1, -1])
