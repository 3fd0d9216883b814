"""Benchmark of ORT Training's step for every method (issue 14): each stage graph that `kdgraph
merge` writes, against the floor of the student's own step plus the teacher's forward pass.

Run: .venv/bin/python bench/ort_step.py [--methods kd,at,...] [--batch 32] [--size 224]
         [--repeats 3]
Needs .venv (torch, ORT Training) and a kdgraph build ($KDGRAPH_BIN, else target/debug/kdgraph;
merge time is not measured here). Models as bench/gradients.py: torchvision resnet50 (eval
export, BN folded) -> resnet18 (training-mode export), random weights, cached in bench/.cache.
Every session: ORT's defaults (2 intra-op threads on this machine, its arena), one at a time.
Writes bench/results/ort_step.json and prints Markdown tables.

The floor, measured in the same way as the methods:
- `student`: the student's own step in ORT Training like every method, in the very form that every
  joint graph holds (inference-form BatchNorm, kdgraph's cross-entropy): the graph of kdgraph merge
  -m kd --alpha 0 --gamma 1 cut to its cross-entropy (student_alone: merge keeps the teacher and
  a zero-weighted KD term in that graph);
- `teacher`: one forward pass, in an InferenceSession, of the stage graph's teacher cut to the
  tensors the stage reads (own_work.teacher_part: FitNet's hint stops in the teacher's middle,
  and the stage graph runs no further); the whole teacher's forward pass is timed once beside
  the floor check;
- `artifacts student`: ORT's own student-only graph (generate_artifacts with its
  CrossEntropyLoss, the BatchNorms put in inference form by hand), the floor of the first
  version of this benchmark, kept to show where the two student steps differ.
- `own work`: the stage graph's own work, kdgraph's connectors and loss alone (bench/own_work.py):
  VID's regressors, FT's paraphraser and translator, OFD's connectors are the method's compute,
  which any implementation pays.
A stage's floor is the student's step where the stage trains the student, plus the teacher's
forward pass where it runs the teacher, plus its own work. The stage graph and the floor's parts
are timed in rounds (one step of each per round, after a warm-up step of each), and a ratio is the
median of the rounds' ratios, so that the machine's drift, which moves a step by 10-20% over
minutes on this machine, falls on both sides of it.
"""

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.training import artifacts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
from bench import model_pair, save_result  # noqa: E402
from gradients import kdgraph_bin  # noqa: E402
from timing import rounds, seconds  # noqa: E402
import own_work  # noqa: E402
import train_ort  # noqa: E402

METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "ofd")
# Methods whose loss is not a sum over samples: the issue allows them 1.2x the floor, the others 1.05x.
BATCH_RELATIONAL = ("crd", "rkd", "sp", "pkt", "cc")
# Flags a method needs on this pair: resnet18's channels (64..512) differ from resnet50's
# (256..2048), and the reference FSP pairs equal channel counts only.
METHOD_FLAGS = {"fsp": ["--fsp-connectors"]}
CRD_NEGATIVES = 4096  # RepDistiller's 16384 at a quarter: its memory gathers scale with it
CRD_N_DATA = 50000  # CIFAR's training set, RepDistiller's memory size
# onnxruntime names a profile by its prefix and the second its session started, and two sessions
# destroyed with one name write over each other: a session that profiles starts a second later.
PROFILE_NAME_RESOLUTION_S = 1.1


def batch_inputs(batch, size):
    """One batch of random images at `size` and its ImageNet labels, the same at every call."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    return x, (np.arange(batch) % 1000).astype(np.int64)


def student_only(student, workdir, session_options=None):
    """The student alone with CE (ORT's own loss block), its BatchNorms in inference form; its step
    (a Module without an evaluation model, with `session_options`)."""
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
    with train_ort.quiet_gradient_builder():
        artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                                     optimizer=artifacts.OptimType.AdamW, artifact_directory=str(workdir))
    optimizer = onnx.load(str(workdir / "optimizer_model.onnx"))
    optimizer.ir_version = 10
    onnx.save(optimizer, str(workdir / "optimizer_model.onnx"))
    state = train_ort.CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
    module = train_ort.Module(str(workdir / "training_model.onnx"), state, None, session_options=session_options)
    if session_options is not None and session_options.enable_profiling:
        time.sleep(PROFILE_NAME_RESOLUTION_S)  # the optimizer's session profiles under the module's prefix
    optimizer = train_ort.Optimizer(str(workdir / "optimizer_model.onnx"), module)

    def step(x, y):
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
    return step


def merge(method, teacher, student, out, extra=()):
    """kdgraph merge -m method (no tract check): the main stage's sidecar."""
    out.mkdir(parents=True, exist_ok=True)
    joint = out / f"{method}.onnx"
    crd = ["--crd-n-data", str(CRD_N_DATA), "--crd-negatives", str(CRD_NEGATIVES)] if method == "crd" else []
    done = subprocess.run([str(kdgraph_bin()), "merge", str(teacher), str(student), "-m", method, "-o", str(joint),
                           "--no-check", *crd, *extra], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kdgraph merge -m {method} failed: {done.stderr.strip()}")
    return joint.with_suffix(".json")


def stage_sidecars(sidecar_path):
    """[(stage name, sidecar path)] in training order."""
    main = train_ort.read_sidecar(sidecar_path)
    return [(spec["name"], Path(sidecar_path).parent / spec["sidecar"]) for spec in main["stages"]]


def feeds_for(stage, sidecar, x, y):
    """The inputs of one step: the image, the labels where the stage takes them, CRD's state."""
    feeds = {train_ort.input_with_role(sidecar, "image"): x}
    if any(i["role"] == "labels" for i in sidecar["inputs"]):
        feeds["labels"] = y
    if "kd/crd/index" in stage.roles:
        data = train_ort.Data(np.zeros((sidecar["hyper"]["crd"]["n_data"], 1), np.float32),
                              np.arange(sidecar["hyper"]["crd"]["n_data"]) % 1000)
        index = np.arange(len(y), dtype=np.int64)
        feeds.update(train_ort.crd_state(sidecar["hyper"]["crd"]))
        feeds.update({"kd/crd/index": index, "kd/crd/contrast_index": data.contrast(index, CRD_NEGATIVES)})
    return feeds


def student_alone(sidecar_path, workdir):
    """The sidecar (a dict) of the student's own graph: the plain graph of `merge -m kd --alpha 0
    --gamma 1` cut to what its cross-entropy and logits need. merge keeps the teacher in that graph
    (its KD term is weighted 0, not removed), so uncut it would count the teacher's forward pass twice
    in the floor."""
    sidecar = train_ort.read_sidecar(sidecar_path)
    image = train_ort.input_with_role(sidecar, "image")
    outputs = ["loss/ce", "logits"]  # output 0 is the loss ORT Training differentiates
    alone = onnx.utils.Extractor(onnx.load(sidecar["model_path"])).extract_model([image, "labels"], outputs)
    kept = {t.name for t in alone.graph.initializer}
    if set(sidecar["requires_grad"]) - kept:
        raise RuntimeError(f"{sidecar_path}: the cross-entropy does not reach {sorted(set(sidecar['requires_grad']) - kept)}")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "student_alone.onnx"
    onnx.save(alone, str(path))
    by_name = {o["name"]: o for o in sidecar["outputs"]}
    return {**sidecar, "model_path": str(path), "outputs": [by_name[name] for name in outputs],
            "inputs": [i for i in sidecar["inputs"] if i["name"] in (image, "labels")],
            "frozen_params": [name for name in sidecar["frozen_params"] if name in kept]}


def stage_runner(sidecar, workdir, x, y):
    """One ORT Training step of a stage graph (its sidecar's path, or the sidecar), as a callable."""
    sidecar = sidecar if isinstance(sidecar, dict) else train_ort.read_sidecar(sidecar)
    stage = train_ort.Stage(sidecar, workdir)
    feeds = feeds_for(stage, sidecar, x, y)
    return lambda: stage.step(feeds)


def own_runners(sidecar_path, workdir, x, y):
    """{"own": step of a stage graph's own work (own_work's note), "teacher": the forward pass of
    its teacher cut to what the stage reads (own_work.teacher_part)}, holds student, holds teacher."""
    sidecar = train_ort.read_sidecar(sidecar_path)
    model = onnx.load(sidecar["model_path"])
    cut, cut_sidecar = own_work.own_graph(model, sidecar, len(y))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "own_work.onnx"
    onnx.save(cut, str(path))
    runs = {"own": stage_runner({**cut_sidecar, "model_path": str(path)}, workdir / "artifacts", x, y),
            "teacher": lambda: None}
    with_teacher = own_work.holds_teacher(model)
    if with_teacher:
        onnx.save(own_work.teacher_part(model), str(workdir / "teacher.onnx"))
        runs["teacher"] = teacher_runner(workdir / "teacher.onnx", x)
    return runs, own_work.holds_student(model), with_teacher


def teacher_runner(teacher, x):
    """One forward pass of a teacher model in an InferenceSession, as a callable."""
    session = onnxruntime.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {session.get_inputs()[0].name: x})


def step_rounds(runs, repeats):
    """{name: [seconds per round]}: timing.rounds of one call of each callable of `runs` per round,
    after a warm-up round."""
    return rounds({name: partial(seconds, run) for name, run in runs.items()}, repeats)


def median(values):
    return float(np.median(values))


def stage_row(times, with_student, with_teacher, goal):
    """A stage's medians and its ratios to the floor, each the median of the rounds' ratios."""
    parts = [s * with_student + t * with_teacher for s, t in zip(times["student"], times["teacher"])]
    return {"seconds": median(times["step"]), "own_work": median(times["own"]),
            "student_step": median(times["student"]), "teacher_forward": median(times["teacher"]),
            "student": with_student, "teacher": with_teacher,
            "floor": median([p + o for p, o in zip(parts, times["own"])]),
            "ratio": median([m / (p + o) for m, p, o in zip(times["step"], parts, times["own"])]),
            "ratio_without_own_work": median([m / p for m, p in zip(times["step"], parts)]),
            "goal": goal, "rounds": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per stage graph (default 3)")
    args = parser.parse_args()
    teacher, student = model_pair(args.size)
    x, y = batch_inputs(args.batch, args.size)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kdgraph-ort-step-") as tmp:
        work = Path(tmp)
        plain = merge("kd", teacher, student, work / "floor", ["--alpha", "0", "--gamma", "1"])
        student_step = stage_runner(student_alone(plain, work / "floor" / "plain"), work / "floor" / "plain", x, y)
        artifacts_step = student_only(student, work / "floor" / "artifacts_student")
        floor_check = step_rounds({"student": student_step, "artifacts_student": partial(artifacts_step, x, y),
                              "whole_teacher": teacher_runner(teacher, x)}, args.repeats)
        del artifacts_step
        print("floor: student {:.2f} s against ORT's own student-only graph {:.2f} s; the whole teacher's "
              "forward pass {:.2f} s".format(*(median(floor_check[k]) for k in
                                                ("student", "artifacts_student", "whole_teacher"))), flush=True)
        for method in args.methods.split(","):
            (work / method).mkdir()
            for stage, sidecar in stage_sidecars(merge(method, teacher, student, work / method,
                                                       METHOD_FLAGS.get(method, []))):
                name = method if stage == "main" else f"{method} ({stage})"
                parts, with_student, with_teacher = own_runners(sidecar, work / method / f"{stage}-own", x, y)
                runs = {"step": stage_runner(sidecar, work / method / stage, x, y), "student": student_step, **parts}
                goal = 1.2 if method in BATCH_RELATIONAL else 1.05
                rows[name] = stage_row(step_rounds(runs, args.repeats), with_student, with_teacher, goal)
                del runs, parts
                gc.collect()  # the stage's sessions go before the next stage's come
                row = rows[name]
                print(f"{name}: {row['seconds']:.2f} s, its own work {row['own_work']:.2f} s, "
                      f"{row['ratio']:.2f}x the floor", flush=True)
    result = {"versions": {"onnxruntime": onnxruntime.__version__, "kdgraph": str(kdgraph_bin())},
              "batch": args.batch, "size": args.size, "repeats": args.repeats, "floor_check": floor_check, "steps": rows}
    save_result("ort_step", result)
    print("| stage graph | step | its own work | floor (parts) | x floor | x floor without own work | goal |\n"
          "|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        parts = " + ".join(p for p, held in (("student", row["student"]), ("teacher", row["teacher"])) if held)
        print(f"| {name} | {row['seconds']:.2f} s | {row['own_work']:.2f} s | {row['floor']:.2f} s ({parts} + own) "
              f"| {row['ratio']:.2f} | {row['ratio_without_own_work']:.2f} | {row['goal']} |")


if __name__ == "__main__":
    main()
