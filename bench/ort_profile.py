"""Where ORT Training's step time goes (issue 14): onnxruntime's own profiler, per operator type, for
the student alone (kdgraph's graph and ORT's artifacts graph, bench/ort_step.py's floor) and the
main stage graph of chosen methods.

Run: .venv/bin/python bench/ort_profile.py [--methods kd,at] [--batch 32] [--size 224] [--steps 3]
Same models, inputs and sessions as bench/ort_step.py, except that each training session is built
without an evaluation model (ORT Training's Module would write both sessions' profiles into one
file) and with profiling on. The training session (forward and backward) and the optimizer's session
(it takes the module's options) are both profiled. One warm-up step, then --steps profiled steps, whose kernel times are
summed per operator type and divided by --steps. Writes bench/results/ort_profile.json and prints
a Markdown table (milliseconds per step).
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from bench import model_pair, save_result  # noqa: E402
from ort_step import PROFILE_NAME_RESOLUTION_S, batch_inputs, feeds_for, merge, stage_sidecars, student_alone, student_only  # noqa: E402
import train_ort  # noqa: E402

SHOWN = 12  # operator types in the printed table: the costliest over all graphs


def profiled_options(prefix):
    """train_ort's session options with onnxruntime's profiler writing to `prefix`*.json."""
    options = train_ort.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return options


def profiled_step(prefix, steps):
    """per_op_type summed over the profiles that sessions with `prefix` wrote when they were
    destroyed: the training session's and the optimizer's (it takes the module's options)."""
    gc.collect()
    found = sorted(prefix.parent.glob(prefix.name + "*.json"))
    if not found:
        raise RuntimeError(f"no profile {prefix}*.json was written")
    total = {"run_ms": 0.0, "ops": defaultdict(float)}
    for path in found:
        one = per_op_type(path, steps)
        total["run_ms"] += one["run_ms"]
        for op, ms in one["ops"].items():
            total["ops"][op] += ms
    return {"run_ms": total["run_ms"], "ops": dict(total["ops"])}


def per_op_type(path, steps):
    """{"run_ms": the mean `model_run` time, "ops": {operator type: kernel ms}} per step over the
    last `steps` runs in the profile at `path` (one session's)."""
    events = json.loads(path.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])[-steps:]
    if len(runs) < steps:
        raise RuntimeError(f"{path}: {len(runs)} runs profiled, {steps} wanted")
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    ops = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in spans):
            ops[e["args"]["op_name"]] += e["dur"] / 1000.0 / steps
    return {"run_ms": float(np.mean([r["dur"] for r in runs])) / 1000.0, "ops": dict(ops)}


def profile_stage(sidecar, workdir, x, y, steps):
    """profiled_step of one stage graph (its sidecar's path, or the sidecar; its artifacts made by
    train_ort.Stage)."""
    sidecar = sidecar if isinstance(sidecar, dict) else train_ort.read_sidecar(sidecar)
    stage = train_ort.Stage(sidecar, workdir)
    prefix = workdir / "profile"
    stage.module = train_ort.Module(str(workdir / "training_model.onnx"), stage.state, None,
                                    session_options=profiled_options(prefix))
    time.sleep(PROFILE_NAME_RESOLUTION_S)
    stage.optimizer = train_ort.Optimizer(str(workdir / "optimizer_model.onnx"), stage.module)
    feeds = feeds_for(stage, sidecar, x, y)
    for _ in range(steps + 1):
        stage.step(feeds)
    del stage
    return profiled_step(prefix, steps)


def profile_artifacts_student(student, workdir, x, y, steps):
    """per_op_type of ORT's own student-only graph (bench/ort_step.py's `artifacts student`)."""
    prefix = workdir / "profile"
    step = student_only(student, workdir, profiled_options(prefix))
    for _ in range(steps + 1):
        step(x, y)
    del step
    return profiled_step(prefix, steps)


def table(graphs):
    """Markdown: the costliest operator types (ms per step) per graph, then every other type's sum."""
    totals = defaultdict(float)
    for g in graphs.values():
        for op, ms in g["ops"].items():
            totals[op] += ms
    shown = sorted(totals, key=totals.get, reverse=True)[:SHOWN]
    lines = ["| operator | " + " | ".join(graphs) + " |", "|---|" + "---|" * len(graphs)]
    for op in shown:
        lines.append(f"| {op} | " + " | ".join(f"{g['ops'].get(op, 0.0):.0f}" for g in graphs.values()) + " |")
    lines.append("| other | " + " | ".join(f"{sum(ms for op, ms in g['ops'].items() if op not in shown):.0f}"
                                          for g in graphs.values()) + " |")
    lines.append("| all kernels | " + " | ".join(f"{sum(g['ops'].values()):.0f}" for g in graphs.values()) + " |")
    lines.append("| model_run | " + " | ".join(f"{g['run_ms']:.0f}" for g in graphs.values()) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kd,at")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    teacher, student = model_pair(args.size)
    x, y = batch_inputs(args.batch, args.size)
    graphs = {}
    with tempfile.TemporaryDirectory(prefix="kdgraph-ort-profile-") as tmp:
        work = Path(tmp)
        plain = merge("kd", teacher, student, work / "plain", ["--alpha", "0", "--gamma", "1"])
        graphs["student (kdgraph)"] = profile_stage(student_alone(plain, work / "plain"), work / "plain" / "main", x, y,
                                                    args.steps)
        graphs["student (ORT artifacts)"] = profile_artifacts_student(student, work / "artifacts", x, y, args.steps)
        for method in args.methods.split(","):
            main_stage = dict(stage_sidecars(merge(method, teacher, student, work / method)))["main"]
            graphs[method] = profile_stage(main_stage, work / method / "main", x, y, args.steps)
            print(f"{method}: {graphs[method]['run_ms']:.0f} ms per step", flush=True)
    save_result("ort_profile", {"batch": args.batch, "size": args.size, "steps": args.steps, "graphs": graphs})
    print(table(graphs))


if __name__ == "__main__":
    main()
