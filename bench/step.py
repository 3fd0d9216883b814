"""Benchmark of one whole training step (issue 12): the step graph of `kdgraph merge --emit step` on
stock onnxruntime and on tract (`kdgraph train`), against ORT Training's step of the joint graph and
a PyTorch eager step (forward, backward, torch.optim.AdamW) of the same two modules.

Run: .venv/bin/python bench/step.py [--sizes 64,224] [--methods kd,at] [--batch 32] [--rounds 5]
Needs .venv (torch, ORT Training), .venv-ort (stock onnxruntime 1.31; scripts/python-env.sh makes
both) and a release build of kdgraph (`cargo build --release`; $KDGRAPH_BIN overrides): the tract
route's speed is the build's. Models as bench/gradients.py: torchvision resnet50 (eval export, BN
folded) -> resnet18 (training-mode export), random weights, cached in bench/.cache.

Stock onnxruntime, ORT Training and PyTorch are timed in interleaved rounds (bench/timing.rounds),
one step each per round after a warm-up round: stock onnxruntime in a worker process (.venv-ort)
that runs examples/train_onnxruntime.py's StepRunner (IOBinding, parameters never copied to the
host), ORT Training through examples/train_ort.py. tract's step is a whole `kdgraph train` run of
1 + R steps less a run of 1 step, divided by R (both under /usr/bin/time for the peak memory),
so it includes nothing of loading and checking the graph. AdamW everywhere, lr 1e-4. Peak memory:
the worker's (stock onnxruntime) and the longer `kdgraph train` run's, each a whole process.
Writes bench/results/step.json and prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
from bench import CACHE, model_pair, save_result  # noqa: E402
from gradients import THREADS, pytorch_step  # noqa: E402
from timing import Worker, rounds, seconds  # noqa: E402
import train_ort  # noqa: E402

ROUNDS = 5
TRACT_STEPS = 4

# A worker in .venv-ort: the step graph in examples/train_onnxruntime.py's StepRunner; each line
# "step" on stdin gets one step's seconds back, "peak" the process's peak RSS in MiB.
STOCK_WORKER = r"""
import resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import train_onnxruntime as t
sidecar = t.read_stage(sys.argv[2])
with np.load(sys.argv[3]) as data:
    x, y = data["x"], data["y"]
carried = sidecar["step"]["carried"]
runner = t.StepRunner(sidecar, carried, t.initial_values(sidecar, carried, {}), {})
import onnxruntime
print(onnxruntime.__version__, flush=True)
done = 0
for line in sys.stdin:
    if line.strip() == "peak":
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
        continue
    done += 1
    start = time.perf_counter(); runner.step(x, y, 1e-4, done)
    print(time.perf_counter() - start, flush=True)
"""


def kdgraph_bin():
    return Path(os.environ.get("KDGRAPH_BIN", ROOT / "target" / "release" / "kdgraph"))


def tract_step(sidecar, data, batch, workdir):
    """(seconds per step, peak MiB) of `kdgraph train`: a run of 1 + TRACT_STEPS steps less a run of 1."""
    measured = {}
    for steps in (1, 1 + TRACT_STEPS):
        out = workdir / f"tract-{steps}"
        out.mkdir(exist_ok=True)
        cmd = ["/usr/bin/time", "-f", "%e %M", str(kdgraph_bin()), "train", str(sidecar), "--data", str(data),
               "--steps", str(steps), "--batch", str(batch), "--lr", "1e-4", "-o", str(out / "student.onnx"),
               "--log-every", "1000"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd[3:])}` failed: {run.stderr.strip()[-400:]}")
        wall, peak_kib = run.stderr.strip().splitlines()[-1].split()
        measured[steps] = (float(wall), float(peak_kib) / 1024)
    return (measured[1 + TRACT_STEPS][0] - measured[1][0]) / TRACT_STEPS, measured[1 + TRACT_STEPS][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--methods", default="kd,at")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    stock_python = ROOT / ".venv-ort" / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    rows, stock_version = [], None
    for size in [int(s) for s in args.sizes.split(",")]:
        teacher, student = model_pair(size)
        rng = np.random.default_rng(0)
        count = args.batch * (1 + TRACT_STEPS)
        x_all = rng.standard_normal((count, 3, size, size), dtype=np.float32)
        y_all = (np.arange(count) % 1000).astype(np.int64)
        data = CACHE / f"step_data_{size}_{args.batch}.npz"
        np.savez(data, x=x_all, y=y_all)
        x, y = x_all[: args.batch], y_all[: args.batch]
        batch_file = CACHE / f"step_batch_{size}_{args.batch}.npz"
        np.savez(batch_file, x=x, y=y)
        for method in args.methods.split(","):
            folder = CACHE / f"step_{method}_{size}"
            folder.mkdir(exist_ok=True)
            joint = folder / "joint.onnx"
            subprocess.run([str(kdgraph_bin()), "merge", str(teacher), str(student), "-m", method, "-o", str(joint),
                            "--emit", "step", "--no-check"], check=True, stdout=subprocess.DEVNULL)
            sidecar = joint.with_suffix(".json")
            with tempfile.TemporaryDirectory() as work:
                tract_s, tract_peak = tract_step(sidecar, data, args.batch, Path(work))
            worker = Worker(stock_python, STOCK_WORKER, ROOT / "examples", sidecar, batch_file)
            stock_version = worker.version
            stage = train_ort.Stage(sidecar, folder / "artifacts")
            torch_run = pytorch_step(method, x, y, update=True)
            times = rounds({
                "stock_step_s": lambda: worker.ask("step"),
                "ort_training_step_s": lambda: seconds(lambda: stage.step({"input": x, "labels": y})),
                "pytorch_step_s": lambda: seconds(torch_run),
            }, args.rounds)
            stock_peak = worker.ask("peak")
            worker.close()
            stock = np.array(times["stock_step_s"])
            row = {"method": method, "size": size, "batch": args.batch, "load_average": os.getloadavg()[0]}
            row.update({name: float(np.median(t)) for name, t in times.items()})
            row.update({"tract_step_s": tract_s, "tract_peak_mib": tract_peak, "stock_peak_mib": stock_peak})
            row["stock_over_ort_training"] = float(np.median(stock / np.array(times["ort_training_step_s"])))
            row["stock_over_pytorch"] = float(np.median(stock / np.array(times["pytorch_step_s"])))
            row["tract_over_stock"] = tract_s / row["stock_step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_result("step", {
        "versions": {"onnxruntime_stock": stock_version, "onnxruntime_training": onnxruntime.__version__,
                     "torch": torch.__version__, "kdgraph": str(kdgraph_bin())},
        "threads": THREADS, "rounds": args.rounds, "tract_steps": TRACT_STEPS,
        "statistic": "median of interleaved rounds (ratios: median of the rounds' ratios); tract: (run of 1+R steps - run of 1) / R",
        "rows": rows,
    })
    print("| method | size | stock ORT step | tract step | ORT Training step | PyTorch eager step | stock / ORT Training | stock / PyTorch | tract / stock | peak MiB (stock, tract) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size']} | {r['stock_step_s']:.3f} s | {r['tract_step_s']:.3f} s | {r['ort_training_step_s']:.3f} s | "
              f"{r['pytorch_step_s']:.3f} s | {r['stock_over_ort_training']:.2f}x | {r['stock_over_pytorch']:.2f}x | "
              f"{r['tract_over_stock']:.2f}x | {r['stock_peak_mib']:.0f}, {r['tract_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
