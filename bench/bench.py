"""Benchmarks of issue 3: merge time against the prost I/O floor, and one ORT training step of
the joint graph against a student-only step plus a teacher forward pass.

Run: .venv/bin/python bench/bench.py   (builds kdgraph in release mode first; about 10 minutes)
Models: torchvision resnet50 (eval export, BN folded) as teacher and resnet18 (training-mode
export) as student at 224x224, random weights; cached in bench/.cache.
"""

import json
import os
import resource
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
sys.path.insert(0, str(ROOT / "tests" / "python"))
import ort_train  # noqa: E402  (the test suite's ORT Training helper)

SIZE = 224
REPEATS = 5


def export(name, train, path):
    if path.exists():
        return path
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, SIZE, SIZE)
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
    """Wall time of the best of REPEATS runs and the peak RSS (MiB) of the command."""
    best = float("inf")
    peak = 0
    for _ in range(REPEATS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    return best, peak / 1024


def step_time(run, repeats=10):
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

    torch.set_num_threads(2)
    batch = 32
    x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    y = (np.arange(batch) % 1000).astype(np.int64)
    for method in ["kd", "at"]:
        session = ort_train.TrainingSession(out / f"{method}.onnx", out / f"art_{method}")
        results[f"step_{method}_s"] = step_time(lambda: session.step(x, y))
    # The floor: a student-only training step (CE) plus one teacher forward in onnxruntime.
    student_only = ort_train.student_only_session(student, out / "art_student")
    results["step_student_s"] = step_time(lambda: student_only.step(x, y))
    results["teacher_forward_s"] = ort_train.forward_time(teacher, x, step_time)
    floor_step = results["step_student_s"] + results["teacher_forward_s"]
    for method in ["kd", "at"]:
        results[f"step_{method}_ratio"] = results[f"step_{method}_s"] / floor_step
        results[f"merge_{method}_ratio"] = results[f"merge_{method}_s"] / results["floor_s"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
