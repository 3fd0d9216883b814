"""Benchmark of merging (issue 14): `kdgraph merge` against the prost I/O floor, in time and peak
memory, on two model pairs; and what the tract check that merge runs by default costs.

Run: .venv/bin/python bench/bench.py [--repeats 5]   (builds kdgraph in release mode first)
Pairs, random weights, cached in bench/.cache: torchvision resnet50 (eval export, BN folded,
102 MB) -> resnet18 (training-mode export, 47 MB) at 224x224, and wide_resnet101_2 (eval export,
508 MB) -> resnet18. Each command is timed whole (best of --repeats runs; peak RSS by GNU time).
The floor (examples/io_floor.rs) reads, decodes, encodes and writes both models with prost and
nothing else. Writes bench/results/merge.json and prints a Markdown table.

bench/ort_step.py measures the ORT Training step of every method's graph.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"

SIZE = 224
# (teacher, student) torchvision names: the pair of every benchmark, and one whose teacher is over 500 MB.
PAIRS = (("resnet50", "resnet18"), ("wide_resnet101_2", "resnet18"))
METHODS = ("kd", "at")


def export(name, train, path, size=SIZE):
    """torchvision `name` (random weights, seed 0) exported once to `path` at size x size: in
    training mode (BatchNorms kept) or eval mode (folded)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
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


def model_pair(size, teacher="resnet50", student="resnet18"):
    """The cached exports (teacher, student) at size x size: the teacher in eval mode, the student in training mode."""
    return (export(teacher, False, CACHE / f"{teacher}_eval_{size}.onnx", size),
            export(student, True, CACHE / f"{student}_train_{size}.onnx", size))


def provenance():
    """Where a results document comes from: the command, the commit (-dirty: with uncommitted changes) and the machine."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}}


def save_result(name, result):
    """bench/results/<name>.json: `result` after its provenance()."""
    document = {**provenance(), **result}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")


def timed(cmd, repeats):
    """Wall time of the best of `repeats` runs and the peak RSS (MiB) of the command (GNU time)."""
    best = float("inf")
    peak = 0
    for _ in range(repeats):
        start = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, int(run.stderr.strip().splitlines()[-1]))
    return best, peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--example", "io_floor", "--bin", "kdgraph"], cwd=ROOT, check=True)
    kdgraph = ROOT / "target" / "release" / "kdgraph"
    floor = ROOT / "target" / "release" / "examples" / "io_floor"
    version = subprocess.run([str(kdgraph), "--version"], capture_output=True, text=True).stdout.strip()
    result = {"versions": {"kdgraph": version}, "repeats": args.repeats, "pairs": {}}
    out = Path(tempfile.mkdtemp())
    try:
        for teacher_name, student_name in PAIRS:
            teacher, student = model_pair(SIZE, teacher_name, student_name)
            pair = {"teacher_mb": teacher.stat().st_size / 1e6, "student_mb": student.stat().st_size / 1e6}
            pair["floor_s"], pair["floor_peak_mib"] = timed([str(floor), str(teacher), str(student), str(out)], args.repeats)
            for method in METHODS:
                merge = [str(kdgraph), "merge", str(teacher), str(student), "-m", method, "-o", str(out / f"{method}.onnx")]
                seconds, peak = timed(merge + ["--no-check"], args.repeats)
                checked, checked_peak = timed(merge, args.repeats)
                pair[method] = {"seconds": seconds, "peak_mib": peak, "ratio": seconds / pair["floor_s"],
                                "peak_ratio": peak / pair["floor_peak_mib"], "checked_seconds": checked,
                                "check_seconds": checked - seconds, "checked_peak_mib": checked_peak}
            result["pairs"][f"{teacher_name} -> {student_name}"] = pair
    finally:
        shutil.rmtree(out, ignore_errors=True)
    save_result("merge", result)
    print("| pair | floor | merge --no-check (x floor) | peak (x floor's) | tract check |\n|---|---|---|---|---|")
    for name, pair in result["pairs"].items():
        for method in METHODS:
            m = pair[method]
            print(f"| {name}, {method} | {pair['floor_s']:.2f} s, {pair['floor_peak_mib']:.0f} MiB | {m['seconds']:.2f} s "
                  f"({m['ratio']:.2f}x) | {m['peak_mib']:.0f} MiB ({m['peak_ratio']:.2f}x) | +{m['check_seconds']:.2f} s |")


if __name__ == "__main__":
    main()
