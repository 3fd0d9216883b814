"""Benchmark of merging (issue 14): `kdgraph merge` against the prost I/O floor, in time and peak
memory, on two model pairs; and what the tract check that merge runs by default costs.

Run: .venv/bin/python bench/bench.py [--repeats 7]   (builds kdgraph in release mode first)
Pairs, random weights, cached in bench/.cache: torchvision resnet50 (eval export, BN folded,
102 MB) -> resnet18 (training-mode export, 47 MB) at 224x224, and wide_resnet101_2 (eval export,
508 MB) -> resnet18. Each command is timed whole (wall, CPU and peak RSS by GNU time), in rounds:
one run of every command per round, after a warm-up round; times are medians over the rounds,
ratios the medians of the rounds' ratios, peaks the largest.
The floor (examples/io_floor.rs) reads, decodes, encodes and writes both models with prost and
nothing else; the durable floor writes them as merge writes its outputs (temporary file, synced to
disk, renamed). CPU time (user + system) is reported beside wall time: the work merge adds, free
of waits on the disk. Before each run, os.sync() puts the last run's writes on disk, so that no run waits
on another's. Writes bench/results/merge.json and prints a Markdown table.

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
from functools import partial
from pathlib import Path
from statistics import median

import torch
import torchvision

from timing import rounds

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


def run_once(cmd):
    """(wall seconds, peak RSS in MiB, CPU seconds: user + system) of one run of `cmd` (GNU time),
    after os.sync(), so that no run waits on the writes of the one before."""
    os.sync()
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M %U %S"] + cmd, check=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    rss, user, system = run.stderr.strip().splitlines()[-1].split()
    return wall, int(rss) / 1024, float(user) + float(system)


def command_rounds(commands, repeats):
    """{name: {"wall": [...], "peak": [...], "cpu": [...]}}: timing.rounds of one run_once of each
    command per round, after a warm-up round (the models in the page cache)."""
    taken = rounds({name: partial(run_once, cmd) for name, cmd in commands.items()}, repeats)
    return {name: dict(zip(("wall", "peak", "cpu"), map(list, zip(*runs)))) for name, runs in taken.items()}


def per_round(times, a, b, key="wall"):
    """The median over rounds of command a's time over command b's."""
    return median([x / y for x, y in zip(times[a][key], times[b][key])])


def pair_row(times, methods):
    """A pair's medians, its floors and, per method, the ratios to them (medians of the rounds' ratios)."""
    row = {"floor_s": median(times["floor"]["wall"]), "floor_peak_mib": max(times["floor"]["peak"]),
           "floor_cpu_s": median(times["floor"]["cpu"]), "durable_floor_s": median(times["durable floor"]["wall"])}
    for method in methods:
        plain, checked = method, f"{method} checked"
        row[method] = {
            "seconds": median(times[plain]["wall"]), "peak_mib": max(times[plain]["peak"]),
            "cpu_s": median(times[plain]["cpu"]),
            "ratio": per_round(times, plain, "floor"), "durable_ratio": per_round(times, plain, "durable floor"),
            "cpu_ratio": per_round(times, plain, "floor", "cpu"),
            "peak_ratio": max(times[plain]["peak"]) / row["floor_peak_mib"],
            "check_seconds": median([c - p for c, p in zip(times[checked]["wall"], times[plain]["wall"])]),
            "check_cpu_s": median([c - p for c, p in zip(times[checked]["cpu"], times[plain]["cpu"])]),
            "checked_peak_mib": max(times[checked]["peak"])}
    row["rounds"] = times
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--example", "io_floor", "--bin", "kdgraph"], cwd=ROOT, check=True)
    kdgraph = ROOT / "target" / "release" / "kdgraph"
    floor_bin = ROOT / "target" / "release" / "examples" / "io_floor"
    version = subprocess.run([str(kdgraph), "--version"], capture_output=True, text=True).stdout.strip()
    result = {"versions": {"kdgraph": version}, "repeats": args.repeats, "pairs": {}}
    out = Path(tempfile.mkdtemp())
    try:
        for teacher_name, student_name in PAIRS:
            teacher, student = model_pair(SIZE, teacher_name, student_name)
            floor = [str(floor_bin), str(teacher), str(student), str(out)]
            commands = {"floor": floor, "durable floor": floor + ["--durable"]}
            for method in METHODS:
                merge = [str(kdgraph), "merge", str(teacher), str(student), "-m", method, "-o", str(out / f"{method}.onnx")]
                commands.update({method: merge + ["--no-check"], f"{method} checked": merge})
            pair = {"teacher_mb": teacher.stat().st_size / 1e6, "student_mb": student.stat().st_size / 1e6,
                    **pair_row(command_rounds(commands, args.repeats), METHODS)}
            result["pairs"][f"{teacher_name} -> {student_name}"] = pair
    finally:
        shutil.rmtree(out, ignore_errors=True)
    save_result("merge", result)
    print("| pair, method | I/O floor | durable floor | merge --no-check | x floor | x durable floor | x floor's CPU "
          "| peak (x floor's) | the tract check adds |\n|---|---|---|---|---|---|---|---|---|")
    for name, pair in result["pairs"].items():
        for method in METHODS:
            m = pair[method]
            print(f"| {name}, {method} | {pair['floor_s']:.2f} s, {pair['floor_peak_mib']:.0f} MiB | "
                  f"{pair['durable_floor_s']:.2f} s | {m['seconds']:.2f} s | {m['ratio']:.2f} | {m['durable_ratio']:.2f} | "
                  f"{m['cpu_ratio']:.2f} | {m['peak_mib']:.0f} MiB ({m['peak_ratio']:.2f}x) | "
                  f"{m['check_seconds']:.2f} s ({m['check_cpu_s']:.2f} s CPU) |")


if __name__ == "__main__":
    main()
