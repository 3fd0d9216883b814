"""Benchmarks of issue 3: merge time against the prost I/O floor, and one ORT training step of
the joint graph against a student-only step plus a teacher forward pass.

Run: .venv/bin/python bench/bench.py   (builds kdgraph in release mode first; about 10 minutes)
Models: torchvision resnet50 (eval export, BN folded) as teacher and resnet18 (training-mode
export) as student at 224x224, random weights; cached in bench/.cache.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT / "examples"))
import train_ort  # noqa: E402

import onnxruntime  # noqa: E402
from onnxruntime.training import artifacts  # noqa: E402

SIZE = 224
REPEATS = 5


def export(name, train, path, size=SIZE):
    """torchvision `name` (random weights, seed 0) exported once to `path` at size x size: in
    training mode (BatchNorms kept) or eval mode (folded)."""
    if path.exists():
        return path
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, size, size)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    if train:
        model.train()
        kwargs.update(training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    else:
        model.eval()
    torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def timed(cmd):
    """Wall time of the best of REPEATS runs and the peak RSS (MiB) of the command (GNU time)."""
    best = float("inf")
    peak = 0
    for _ in range(REPEATS):
        start = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, int(run.stderr.strip().splitlines()[-1]))
    return best, peak / 1024


def student_only(student, workdir):
    """The student alone with CE (ORT's own loss block), its BatchNorms in inference form."""
    model = onnx.load(str(student))
    frozen, trainable = [], []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            for attribute in [a for a in node.attribute if a.name == "training_mode"]:
                node.attribute.remove(attribute)
            frozen.extend(node.input[3:5])
    weights = {n.input[i] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "BatchNormalization") for i in (1, 2) if len(n.input) > i}
    trainable = [t.name for t in model.graph.initializer if t.name in weights and t.name not in frozen]
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(workdir))
    optimizer = onnx.load(str(workdir / "optimizer_model.onnx"))
    optimizer.ir_version = 10
    onnx.save(optimizer, str(workdir / "optimizer_model.onnx"))
    state = train_ort.CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
    module = train_ort.Module(str(workdir / "training_model.onnx"), state, str(workdir / "eval_model.onnx"))
    optimizer = train_ort.Optimizer(str(workdir / "optimizer_model.onnx"), module)

    def step(x, y):
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
    return step


def step_time(run, repeats=5):
    """Median wall time of `repeats` calls of `run`, after one warm-up call."""
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--example", "io_floor", "--bin", "kdgraph"], cwd=ROOT, check=True)
    kdgraph = ROOT / "target" / "release" / "kdgraph"
    floor = ROOT / "target" / "release" / "examples" / "io_floor"
    teacher = export("resnet50", False, CACHE / "resnet50_eval.onnx")
    student = export("resnet18", True, CACHE / "resnet18_train.onnx")
    out = Path(tempfile.mkdtemp())
    results = {"models": {"teacher": teacher.stat().st_size, "student": student.stat().st_size}}

    results["floor_s"], results["floor_peak_mib"] = timed([str(floor), str(teacher), str(student), str(out)])
    for method in ["kd", "at"]:
        joint = out / f"{method}.onnx"
        merge = [str(kdgraph), "merge", str(teacher), str(student), "-m", method, "-o", str(joint)]
        results[f"merge_{method}_s"], results[f"merge_{method}_peak_mib"] = timed(merge + ["--no-check"])
        results[f"merge_{method}_checked_s"], _ = timed(merge)

    batch = 32
    x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    y = (np.arange(batch) % 1000).astype(np.int64)
    for method in ["kd", "at"]:
        stage = train_ort.Stage(out / f"{method}.json", out / f"art_{method}")
        results[f"step_{method}_s"] = step_time(lambda: stage.step({"input": x, "labels": y}))
    # The floor: a student-only training step (CE) plus one teacher forward in onnxruntime.
    step = student_only(student, out / "art_student")
    results["step_student_s"] = step_time(lambda: step(x, y))
    session = onnxruntime.InferenceSession(str(teacher))
    results["teacher_forward_s"] = step_time(lambda: session.run(None, {"input": x}))
    floor_step = results["step_student_s"] + results["teacher_forward_s"]
    for method in ["kd", "at"]:
        results[f"step_{method}_ratio"] = results[f"step_{method}_s"] / floor_step
        results[f"merge_{method}_ratio"] = results[f"merge_{method}_s"] / results["floor_s"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
