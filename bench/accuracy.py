"""Test accuracy of students distilled through kdgraph against the same distillation in PyTorch, on scikit-learn's digits."""

# Run (--quick: one method, one seed, about 60 s alone on the machine, 4 minutes beside the full run):
#     .venv/bin/python bench/accuracy.py            # writes bench/results/accuracy.{json,md,png}
#     .venv/bin/python bench/accuracy.py --quick    # what tests/python/test_accuracy_quick.py runs
#     .venv/bin/python bench/accuracy.py --students resnet8 --methods rkd --seeds 3 4 5 --out /tmp/rkd  # a part
#
# Data: scikit-learn's bundled handwritten digits (1,797 8x8 gray images, 10 classes), resized to
# SIZE = 16 (bilinear; twice the digits' own resolution, a quarter of the CIFAR networks' 32x32
# compute, which the time budget needs: see Sizes), the gray channel replicated to 3 (the fixture
# networks unchanged but for their final pooling, see build), normalised by the training split's
# mean and std. A fixed stratified test split of TEST = 600 images (binomial standard error about
# 1 point at 90%, so that differences of a couple of points between methods are visible), and a
# deliberately small stratified training split of TRAIN = 300 images (30 per class) drawn from
# the rest: with that little data the teacher's knowledge has room to matter, and every run is
# short. Augmentation: random shifts of up to SHIFT = 2 pixels (one pixel of the 8x8 original, the
# border at the background value), drawn per seed and epoch and precomputed as arrays, so every
# route sees the same images in the same order.
#
# Models (fixtures/make_fixtures.py, 10 classes): teacher resnet20 (RepDistiller's CIFAR
# ResNet), trained here in PyTorch to convergence and exported in eval mode with its BatchNorms;
# students resnet8 (same family, RepDistiller's resnet8) and vgg8 (RepDistiller's VGG8 with
# BatchNorm, another family), exported in training mode. The larger fixtures (resnet32x4,
# ShuffleV2) would not fit the time budget on two cores; mobile_half (--students mobile_half)
# barely learns at 16x16 in this budget (21-28% plain on every route, PyTorch's included). Per
# seed, one student initialisation, shared by every route (the ONNX export and the PyTorch module
# are the same weights).
#
# Routes (ROUTES): ORT Training (examples/train_ort.py's Stage on the graph of `kdgraph merge`),
# `kdgraph train` (tract) and examples/train_onnxruntime.py (stock onnxruntime 1.31, in .venv-ort,
# one intra-op thread) on the step graph of `kdgraph merge --emit step`, and PyTorch (the same
# modules, the graph's own connector initialisations, kd_reference's losses), the reference.
# Optimizer: AdamW as ORT Training's artifacts build it (betas 0.9/0.999, eps 1e-6, no weight
# decay, bias correction; ORT's "hf" mode puts eps inside the bias correction, so its eps acts
# as torch's eps / sqrt(1 - 0.999^t): 3e-5 at the first step, 4e-6 at the 72nd, which matters only
# where a gradient is that small), the step graph built with the same (STEP_OPTIMIZER: it computes
# what torch.optim.AdamW computes), cosine learning rate from LR to 0 over each stage; the init stage
# of AB, FT and FSP runs INIT_EPOCHS first and its parameters carry into the main stage by name.
# Data order: the step-graph trainers take one .npz per seed holding the main stage's batches one
# after another (stream_file) in file order (--no-shuffle); an init stage's batches are its
# first ones, as in the other routes. CRD: N = TRAIN memory rows and K = CRD_NEGATIVES negatives
# from other classes (RepDistiller's K/N = 16384/50000, scaled), memories initialised as
# train_ort.crd_state does, contrast indices drawn once per seed and fed to ORT Training and
# PyTorch; the step-graph trainers draw their own (the same distributions: uniform memories,
# negatives without replacement from other classes) from --seed, and index the memory by the
# stream's `id` array (each row's training sample).
# Cross-family FSP needs --fsp-connectors (the reference FSP pairs equal channel counts only).
#
# Sizes: BATCH = 25, EPOCHS = 6 (72 steps; init stages INIT_EPOCHS = 2, 24 steps), the teacher
# TEACHER_EPOCHS = 40 (near-perfect on the test split, where the students, on 300 images, are
# not). Time: each run is one thread (--jobs processes at once, default 2), and its CPU time is
# recorded (on a shared machine wall time says more about the others' jobs);
# results["total_cpu_s"] and results["idle_machine_estimate_s"] are a run's measured figures. At
# 32x32 the whole run (teacher, 2 students x 15 configurations x 4 routes x 3 seeds) took 11,174
# CPU seconds on 2026-12-03, 93 minutes of the idle 2-core machine against the 40 it is meant to
# take; 16x16 cuts the convolutions' work fourfold, and the whole run took 5,392 CPU seconds, 45
# minutes.

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from conftest import find_kdgraph_bin, mf  # noqa: E402  (conftest puts examples/ on the path)
import kd_reference as R  # noqa: E402
import train_ort  # noqa: E402
from merge_checks import PREACT_METHODS, Joint, pick_feat  # noqa: E402
from test_merge_stages import GraphParams  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench import provenance  # noqa: E402

THREADS = 1  # per run: more threads than free cores slow PyTorch tenfold on a shared machine
CLASSES, SIZE, CHANNELS = 10, 16, 3
TEST, TRAIN, SHIFT, BATCH = 600, 300, 2, 25
LR = 3e-3
EPOCHS, INIT_EPOCHS, TEACHER_EPOCHS = 6, 2, 40  # the budget: see the timing note at the top
SEEDS = (0, 1, 2)
CRD_NEGATIVES = 100
METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "ofd")
PLAIN = "plain"  # the student alone, cross-entropy
ROUTES = ("ort", "tract", "onnxruntime", "torch")  # PyTorch last: the reference the others are checked against
ROUTE_NAMES = {"ort": "ORT Training", "tract": "kdgraph train", "onnxruntime": "onnxruntime step", "torch": "PyTorch"}
STEP_ROUTES = ("tract", "onnxruntime")  # the step graph of `kdgraph merge --emit step`
REFERENCE = "torch"
PAIRED_P = 0.01  # the paired t-test's p below which a route's difference from PyTorch is starred
# The step graph's optimizer, as ORT Training's artifacts build theirs (onnxblock.optim.AdamW's
# defaults: betas 0.9/0.999, eps 1e-6, no weight decay) and as the PyTorch route's torch.optim.AdamW.
STEP_OPTIMIZER = ["--optimizer", "adamw", "--betas", "0.9,0.999", "--eps", "1e-6", "--weight-decay", "0"]
ORT_PYTHON = ROOT / ".venv-ort" / "bin" / "python"  # stock onnxruntime (1.31) beside the ORT Training venv
# examples/train_onnxruntime.py at THREADS intra-op threads (its sessions take onnxruntime's default,
# one thread per core, which oversubscribes the machine when --jobs runs beside it).
ONE_THREAD_ORT = ("import runpy, sys, onnxruntime as o\n"
                  "class Options(o.SessionOptions):\n"
                  "    def __init__(self):\n"
                  "        super().__init__()\n"
                  f"        self.intra_op_num_threads = {THREADS}\n"
                  "o.SessionOptions = Options\n"
                  "sys.argv[0] = sys.argv.pop(1)\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')\n")
TEACHER = "resnet20"
STUDENTS = ("resnet8", "vgg8")  # the full run's; mobile_half on request (--students)
RESULTS = ROOT / "bench" / "results"

mf.NUM_CLASSES = CLASSES  # the fixture builders read it when they build the classifier
mf.INPUT_SHAPE = (CHANNELS, SIZE, SIZE)  # mf.export traces at it
NETS = {"resnet20": mf.BUILDERS["resnet20"], "resnet8": lambda: mf.ResNet(8, (16, 16, 32, 64)),
        "vgg8": mf.BUILDERS["vgg8_bn"], "mobile_half": mf.BUILDERS["mobile_half"]}
log = train_ort.print_now


def session_options(made=train_ort.session_options):
    """train_ort's session options at THREADS intra-op threads (train_ort.Stage reads them by name)."""
    options = made()
    options.intra_op_num_threads = THREADS
    return options


train_ort.session_options = session_options


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """Gray images (N, 1, SIZE, SIZE) float32, normalised, and labels (N,) int64."""

    x: np.ndarray
    y: np.ndarray


def digits():
    """(train, test) Splits of the digits, resized to SIZE x SIZE, normalised by the training split."""
    data = load_digits()
    x = torch.from_numpy(data.images[:, None] / 16.0).float()
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    rest_x, test_x, rest_y, test_y = train_test_split(x, data.target, test_size=TEST, stratify=data.target, random_state=0)
    train_x, _, train_y, _ = train_test_split(rest_x, rest_y, train_size=TRAIN, stratify=rest_y, random_state=0)
    mean, std = train_x.mean(), train_x.std()
    norm = lambda a: ((a - mean) / std).astype(np.float32)
    return Split(norm(train_x), train_y.astype(np.int64)), Split(norm(test_x), test_y.astype(np.int64))


def rgb(x):
    """The gray channel replicated to CHANNELS."""
    return np.ascontiguousarray(np.repeat(x, CHANNELS, axis=1))


def shifted(x, dy, dx):
    """x (1, H, W) moved by (dy, dx) pixels, the uncovered border at the background value."""
    out = np.full_like(x, x.min())
    h, w = x.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


@dataclasses.dataclass
class Batch:
    """One training batch: dataset indices, augmented images (B, 3, H, W), labels, CRD contrast indices."""

    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    contrast: np.ndarray


def schedule(train, epochs, seed):
    """The batches of `epochs` augmented, shuffled epochs of `train`, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    sampler = train_ort.Data(train.x, train.y, seed)  # RepDistiller's contrast sampling
    batches = []
    for _ in range(epochs):
        order = rng.permutation(len(train.y))
        shifts = rng.integers(-SHIFT, SHIFT + 1, (len(order), 2))
        images = np.stack([shifted(train.x[i], dy, dx) for i, (dy, dx) in zip(order, shifts)])
        for start in range(0, len(order) - BATCH + 1, BATCH):
            index = order[start:start + BATCH]
            batches.append(Batch(index, rgb(images[start:start + BATCH]), train.y[index],
                                 sampler.contrast(index, CRD_NEGATIVES)))
    return batches


def cosine(step, steps):
    """The learning rate of step `step` of `steps`: cosine from LR to 0."""
    return LR * 0.5 * (1.0 + math.cos(math.pi * step / steps))


# --------------------------------------------------------------------------- models


def build(name, seed):
    """A fresh `name` with 10 classes, initialised from `seed` (torch's default initialisation).

    The fixtures' final pooling is sized for 32x32 inputs (AvgPool2d(8) on ResNet's 8x8 maps,
    AvgPool2d(2) on MobileNetV2's 2x2): here it is a global average pool, the same function at
    32x32 and one that fits the SIZE x SIZE maps."""
    torch.manual_seed(seed)
    model = NETS[name]()
    if hasattr(model, "avgpool"):  # VGG's is adaptive already
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    return model


def accuracy_torch(model, test):
    """Test accuracy (%) of a torch model in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(rgb(test.x)))
    return 100.0 * float((logits.argmax(1).numpy() == test.y).mean())


def accuracy_onnx(path, test):
    """Test accuracy (%) of an exported student, run by onnxruntime."""
    session = onnxruntime.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: rgb(test.x)})[0]
    return 100.0 * float((logits.argmax(1) == test.y).mean())


def train_teacher(train, test, epochs, workdir):
    """The teacher trained with cross-entropy (the same augmentation, its own seed), exported in
    eval mode with its BatchNorms (README "Exporting the models"); (onnx path, module, accuracy)."""
    teacher = build(TEACHER, 100)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=LR, eps=1e-6, weight_decay=0.0)
    batches = schedule(train, epochs, 100)
    teacher.train()
    for step, b in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, len(batches))
        loss = F.cross_entropy(teacher(torch.from_numpy(b.x)), torch.from_numpy(b.y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = Path(workdir) / f"{TEACHER}.onnx"
    torch.onnx.export(teacher.eval(), (torch.from_numpy(rgb(test.x[:2])),), str(path), dynamo=True, optimize=False,
                      input_names=["input"], output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("N")}},
                      verbose=False)
    return path, teacher, accuracy_torch(teacher, test)


# --------------------------------------------------------------------------- merging


def merge_args(method, student):
    """kdgraph merge's method options: the plain student is CE alone (KD with weight 0); for the
    other family's student, stage ends paired by resolution (by position, resnet20's maps would meet
    maps of another size: vgg8 has five stages to its three) and FSP's connectors (the channel
    counts differ)."""
    if method == PLAIN:
        return ["-m", "kd", "--alpha", "0", "--gamma", "1"]
    args = ["-m", method]
    if method == "crd":
        args += ["--crd-n-data", str(TRAIN), "--crd-negatives", str(CRD_NEGATIVES)]
    if student != "resnet8":  # another family: stage ends of equal size, FSP's connectors
        args += ["--pairing", "resolution"] + (["--fsp-connectors"] if method == "fsp" else [])
    return args


def kdgraph_bin():
    """The kdgraph binary (KDGRAPH_BIN, else the newest build)."""
    kdgraph, why = find_kdgraph_bin()
    if kdgraph is None:
        raise SystemExit(why)
    return kdgraph


def run_command(cmd):
    """Runs `cmd`; its failure as one RuntimeError with the command and the tail of its stderr."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed ({done.returncode}): {tail}")


def merge(teacher_path, student_path, method, student, out_dir, step):
    """Runs `kdgraph merge` (with `step`, also the step graphs: --emit step, the shared optimizer;
    the joint graph ORT Training trains is the same); the main stage's sidecar path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "joint.onnx"
    emit = ["--emit", "step", *STEP_OPTIMIZER] if step else []
    run_command([kdgraph_bin(), "merge", teacher_path, student_path, "-o", out, "--no-check", *merge_args(method, student), *emit])
    return out.with_suffix(".json")


def stages(sidecar_path):
    """[(stage spec, its sidecar)] in training order."""
    main = train_ort.read_sidecar(sidecar_path)
    return [(spec, train_ort.read_sidecar(Path(sidecar_path).parent / spec["sidecar"])) for spec in main["stages"]]


def stage_epochs(spec, epochs, init_epochs):
    """The epochs of a stage: init_epochs for an init stage."""
    return init_epochs if spec["name"] == "init" else epochs


# --------------------------------------------------------------------------- ORT Training route


def crd_feeds(stage, batch, state):
    """CRD's inputs for one batch (empty for other graphs)."""
    if "kd/crd/index" not in stage.roles:
        return {}
    return {"kd/crd/index": batch.index.astype(np.int64), "kd/crd/contrast_index": batch.contrast, **state}


def run_ort(sidecar_path, train, test, seed, epochs, init_epochs, workdir):
    """Trains every stage with ORT Training; the exported student's test accuracy."""
    carried, stage = None, None
    for spec, sidecar in stages(sidecar_path):
        stage = train_ort.Stage(sidecar, Path(workdir) / spec["name"], lr=LR, carried=carried if spec.get("carry_from") else None)
        image = train_ort.input_with_role(sidecar, "image")
        state = train_ort.crd_state(sidecar["hyper"]["crd"], seed) if "kd/crd/index" in stage.roles else {}
        batches = schedule(train, stage_epochs(spec, epochs, init_epochs), seed)
        for step, b in enumerate(batches):
            stage.optimizer.set_learning_rate(cosine(step, len(batches)))
            out = stage.step({image: b.x, "labels": b.y, **crd_feeds(stage, b, state)})
            state = {name: out[name + train_ort.STATE_SUFFIX] for name in state}
        carried = stage.parameters()
    return accuracy_onnx(stage.export(Path(workdir) / "student.onnx"), test)


# --------------------------------------------------------------------------- step-graph routes


def stream_file(train, epochs, seed, path):
    """The main stage's batches (`schedule`), written one after another as one .npz (x, y, and each
    row's sample in `id`, which CRD's memory is indexed by) that the step-graph trainers take in
    file order (--no-shuffle): the same images, augmentation and order as the other routes. An init
    stage's batches are the first of them (`schedule` draws epoch by epoch from the seed), so its
    trainer takes the first --init-steps batches of the same file."""
    if not path.exists():
        batches = schedule(train, epochs, seed)
        np.savez(path, x=np.concatenate([b.x for b in batches]), y=np.concatenate([b.y for b in batches]),
                 id=np.concatenate([b.index for b in batches]).astype(np.int64))
    return path


def run_step(route, sidecar_path, stream, test, seed, epochs, init_epochs, workdir):
    """Trains every stage's step graph with `kdgraph train` (tract) or examples/train_onnxruntime.py
    (stock onnxruntime, in .venv-ort); the exported student's test accuracy. The seed draws CRD's
    memories and negatives (the batches are the file's)."""
    per_epoch = TRAIN // BATCH
    workdir.mkdir(parents=True, exist_ok=True)
    student = workdir / "student.onnx"
    args = [sidecar_path, "--data", stream, "--steps", epochs * per_epoch, "--init-steps", init_epochs * per_epoch,
            "--batch", BATCH, "--lr", LR, "--schedule", "cosine", "--no-shuffle", "--seed", seed,
            "--log-every", 10 ** 6, "-o", student]
    if route == "tract":
        run_command([kdgraph_bin(), "train", *args])
    elif not ORT_PYTHON.exists():
        raise RuntimeError(f"`{ORT_PYTHON}` is missing: create .venv-ort (bash scripts/test.sh does)")
    else:
        run_command([ORT_PYTHON, "-c", ONE_THREAD_ORT, ROOT / "examples" / "train_onnxruntime.py", *args])
    return accuracy_onnx(student, test)


# --------------------------------------------------------------------------- PyTorch route


class Reference:
    """One stage graph's loss in PyTorch: kd_reference's terms on the torch modules' feats, with the
    graph's added parameters (connectors, embeddings) as autograd leaves at its initial values."""

    def __init__(self, sidecar, student, teacher):
        self.sidecar, self.student, self.teacher = sidecar, student, teacher
        self.hyper = sidecar["hyper"]
        self.methods = [m for m in sidecar["methods"] if m != "kd" or self.hyper["alpha"] > 0]
        self.params = GraphParams(Joint(Path(sidecar["model_path"]), "accuracy", tuple(sidecar["methods"]), sidecar),
                                  torch.float32, grad=True)
        self.preact = any(m in PREACT_METHODS for m in sidecar["methods"])

    def feats(self, x):
        """((student feats, logits), (teacher feats, logits)) of a batch; no student pass in a stage
        that does not train it (FT's init stage: its graph has no student, whose BN statistics stay)."""
        trains_student = set(self.sidecar["requires_grad"]) & {n for n, _ in self.student.named_parameters()}
        s = self.student(x, is_feat=True, preact=self.preact) if trains_student else (None, None)
        with torch.no_grad():
            t = self.teacher(x, is_feat=True, preact=self.preact)
        return s, t

    def taps(self, method, s, t):
        """[(student tap, teacher tap)] and the sidecar's pairs of `method`."""
        pairs = [p for p in self.sidecar["pairs"] if p["method"] == method]
        student = lambda p: None if s[1] is None else pick_feat(*s, p["student_stage"])
        return [(student(p), pick_feat(*t, p["teacher_stage"])) for p in pairs], pairs

    def term(self, method, s, t, feeds):
        """kd_reference's unweighted term of `method` in this stage (None where the stage has none);
        CRD also returns its next state."""
        taps, pairs = self.taps(method, s, t)
        get, init = self.params, self.sidecar["stage"] == "init"
        prefix = f"kd/{method}/{pairs[0]['stage']}/" if pairs else ""
        if method == "kd":
            return R.kd(s[1], t[1], float(self.hyper["temperature"]))
        if method in ("at", "nst"):
            return getattr(R, method)(taps)
        if method in ("sp", "pkt"):
            return getattr(R, method)(*taps[0])
        if method == "rkd":
            return R.rkd(*taps[0])[0]
        if method == "fitnet":
            return R.fitnet(*taps[0], get.convs(prefix + "regressor/", 1, True)[0], bn_batch_stats=True)
        if method == "cc":
            embeds = [get.get(prefix + f"{side}/linear0.{w}", linear=w == "weight")
                      for side in ("embed", "teacher_embed") for w in ("weight", "bias")]
            return R.cc(*taps[0], *embeds)
        if method == "vid":
            regressors = [[c["weight"] for c in get.convs(f"kd/vid/{p['stage']}/regressor/", 3, False)] for p in pairs]
            return R.vid(taps, regressors, [get.get(f"kd/vid/{p['stage']}/log_scale") for p in pairs])
        if method in ("ab", "fsp") and not init:
            return None  # their main stage is cross-entropy alone
        if method == "ab":
            connectors = [None if p["connector"] is None else get.convs(f"kd/ab/{p['stage']}/connector/", 1, True)[0] for p in pairs]
            return R.ab(taps, connectors, bn_batch_stats=True)
        if method == "ft":
            encoder = get.convs(prefix + "teacher_paraphraser/", 3, False)
            if init:
                decoder = get.convs(prefix + "teacher_paraphraser_decoder/", 3, False)
                return R.ft_paraphraser_loss(taps[0][1], encoder, decoder, decoder_as_conv=True)
            return R.ft(*taps[0], encoder, get.convs(prefix + "translator/", 3, True), bn_batch_stats=True)
        if method == "fsp":
            maps = [s_map if p["connector"] is None else self.fsp_connect(p, s_map) for p, (s_map, _) in zip(pairs, taps)]
            return R.fsp(maps, [t_map for _, t_map in taps])
        if method == "crd":
            return self.crd(taps[0], prefix, feeds)
        if method == "ofd":
            connectors = [get.convs(f"kd/ofd/{p['stage']}/connector/", 1, True)[0] for p in pairs]
            bns = [bn_before_relu(self.teacher.get_submodule(p["teacher_module"])) for p in pairs]
            margins = [R.ofd_margin(bn.weight.detach(), bn.bias.detach()) for bn in bns]
            return R.ofd(taps, connectors, margins, reduction="batch", bn_batch_stats=True)
        raise NotImplementedError(method)

    def fsp_connect(self, pair, s_map):
        """FSP's connector (--fsp-connectors): conv1x1 + BN on the student's map."""
        c = self.params.convs(f"kd/fsp/{pair['stage']}/connector/", 1, True)[0]
        return R.batch_norm(F.conv2d(s_map, c["weight"], c.get("bias")), c, bn_batch_stats=True)

    def crd(self, tap, prefix, feeds):
        """(CRD's term, its next state) on this batch's memories."""
        get, crd = self.params, self.hyper["crd"]
        embed = lambda side: {"weight": get.get(prefix + f"{side}/linear0.weight", linear=True),
                              "bias": get.get(prefix + f"{side}/linear0.bias")}
        loss, mem_s, mem_t, z = R.crd(*tap, embed("embed"), embed("teacher_embed"), feeds["kd/crd/memory_student"],
                                      feeds["kd/crd/memory_teacher"], feeds["kd/crd/index"], feeds["kd/crd/contrast_index"],
                                      feeds["kd/crd/z"], N=crd["n_data"], K=crd["negatives"], tau=crd["temperature"],
                                      momentum=crd["momentum"])
        return loss, {"kd/crd/memory_student": mem_s, "kd/crd/memory_teacher": mem_t, "kd/crd/z": z}

    def loss(self, x, y, feeds):
        """(the stage's total loss as the graph weighs it, CRD's next state)."""
        s, t = self.feats(x)
        total = self.hyper["gamma"] * R.ce(s[1], y) if self.sidecar["stage"] == "main" else 0.0
        state = {}
        for method in self.methods:
            term = self.term(method, s, t, feeds)
            if isinstance(term, tuple):
                term, state = term
            if term is None:
                continue
            if self.sidecar["stage"] == "init":
                weight = 1.0  # the init stage trains on its term alone, unweighted
            else:
                weight = self.hyper["alpha"] if method == "kd" else self.hyper["beta"][method]
            total = total + weight * term
        return total, state

    def trainable(self, x, y, feeds):
        """The stage's trainable tensors (the sidecar's requires_grad); a first loss materialises the
        added ones, which must be exactly the sidecar's."""
        self.loss(x, y, feeds)
        student = dict(self.student.named_parameters())
        wanted = set(self.sidecar["requires_grad"])
        added = self.params.trainable_leaves()
        unknown = wanted - set(student) - set(added)
        if unknown:
            raise RuntimeError(f"the PyTorch reference has no parameter for {sorted(unknown)}")
        return [student[n] for n in student if n in wanted] + [added[n] for n in sorted(added) if n in wanted]

    def carry(self, previous):
        """Overwrites the added tensors that `previous` (the init stage's Reference) trained."""
        with torch.no_grad():
            for name, value in previous.params.leaves.items():
                if name in self.params.leaves:
                    self.params.leaves[name].copy_(value)


def bn_before_relu(module):
    """The BatchNorm whose output reaches `module`'s pre-ReLU point (the sidecar's teacher_module of an
    OFD pair): the module itself, or a residual block's last direct BatchNorm (RepDistiller's bn2 of a
    BasicBlock; the shortcut's sits in a child Sequential), as OFD's get_bn_before_relu picks it."""
    if isinstance(module, torch.nn.BatchNorm2d):
        return module
    direct = [m for m in module.children() if isinstance(m, torch.nn.BatchNorm2d)]
    if not direct:
        raise RuntimeError(f"no BatchNorm before the ReLU in {type(module).__name__}")
    return direct[-1]


def torch_crd_state(sidecar, seed):
    """train_ort.crd_state's memories as torch tensors (empty without CRD)."""
    if "crd" not in sidecar["methods"]:
        return {}
    return {k: torch.from_numpy(v) for k, v in train_ort.crd_state(sidecar["hyper"]["crd"], seed).items()}


def run_torch(sidecar_path, student, teacher, train, test, seed, epochs, init_epochs):
    """Trains `student` (in place) stage by stage with the reference losses; its test accuracy."""
    previous = None
    teacher.eval()
    for spec, sidecar in stages(sidecar_path):
        ref = Reference(sidecar, student, teacher)
        state = torch_crd_state(sidecar, seed)
        batches = schedule(train, stage_epochs(spec, epochs, init_epochs), seed)
        feeds = lambda b: {**state, "kd/crd/index": torch.from_numpy(b.index), "kd/crd/contrast_index": torch.from_numpy(b.contrast)}
        student.eval()  # materialises the added parameters; eval mode leaves the BN statistics alone
        with torch.no_grad():
            params = ref.trainable(torch.from_numpy(batches[0].x), torch.from_numpy(batches[0].y), feeds(batches[0]))
        student.train()
        if previous is not None:
            ref.carry(previous)
        optimizer = torch.optim.AdamW(params, lr=LR, eps=1e-6, weight_decay=0.0)
        for step, b in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = cosine(step, len(batches))
            loss, state_next = ref.loss(torch.from_numpy(b.x), torch.from_numpy(b.y), feeds(b))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.update({k: v.detach() for k, v in state_next.items()})
        previous = ref
    return accuracy_torch(student, test)


# --------------------------------------------------------------------------- the benchmark


@dataclasses.dataclass
class Plan:
    """What one invocation runs."""

    students: tuple
    methods: tuple
    seeds: tuple
    epochs: int
    init_epochs: int
    teacher_epochs: int


FULL = Plan(STUDENTS, (PLAIN,) + METHODS, SEEDS, EPOCHS, INIT_EPOCHS, TEACHER_EPOCHS)
QUICK = Plan(("resnet8",), ("kd",), (0,), 6, 2, 8)


def cpu_seconds():
    """CPU time of this process and its finished children: a run's cost on an idle machine, whatever
    else the machine runs (its wall time is not)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_route(route, sidecar, stream, model, teacher, train, test, seed, plan, workdir):
    """The test accuracy (%) of one route's training of a copy of `model`."""
    if route == "ort":
        return run_ort(sidecar, train, test, seed, plan.epochs, plan.init_epochs, workdir)
    if route in STEP_ROUTES:
        return run_step(route, sidecar, stream, test, seed, plan.epochs, plan.init_epochs, workdir)
    return run_torch(sidecar, copy.deepcopy(model), teacher, train, test, seed, plan.epochs, plan.init_epochs)


@dataclasses.dataclass
class Job:
    """One student initialisation (seed), one method and one route, in a worker process."""

    student: str
    seed: int
    method: str
    route: str
    plan: Plan
    teacher_path: Path
    teacher_state: dict
    workdir: Path


def run_job(job):
    """(student, method, route, seed, accuracy or None, wall s, CPU s, why it did not run or None) of one Job:
    merges its own graph (the step graph only for the step routes), then trains; the times count
    both (CPU: this process and its subprocesses, kdgraph's and .venv-ort's). A route that fails,
    for whatever reason, is recorded with its one-line error, and the run goes on."""
    torch.set_num_threads(THREADS)
    train, test = digits()
    teacher = build(TEACHER, 0)
    teacher.load_state_dict(job.teacher_state)
    model = build(job.student, 1000 + job.seed)  # the same weights as the exported student_file
    name = f"{job.student}-{job.seed}-{job.method}-{job.route}"
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        sidecar = merge(job.teacher_path, student_file(job), job.method, job.student, job.workdir / name / "graph",
                        step=job.route in STEP_ROUTES)
        acc = run_route(job.route, sidecar, stream_path(job), model, teacher, train, test, job.seed, job.plan,
                        job.workdir / name)
    except Exception as exc:  # noqa: BLE001  (a cell that fails is recorded and the run goes on)
        why = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        log(f"{name} FAILED: {why}")
        return job.student, job.method, job.route, job.seed, None, 0.0, 0.0, why
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    log(f"{job.student} seed {job.seed} {job.method:7s} {ROUTE_NAMES[job.route]:16s} {acc:6.2f}%  {wall:6.1f} s ({cpu:.1f} s CPU)")
    return job.student, job.method, job.route, job.seed, acc, wall, cpu, None


def stream_path(job):
    """Where the data stream of the job's seed is (stream_file)."""
    return job.workdir / f"stream-{job.seed}.npz"


def student_file(job):
    """The student of `job` exported in training mode: its seed's initialisation, shared by every route."""
    return job.workdir / f"{job.student}-{job.seed}.onnx"


def summary(runs):
    """{"mean", "std", "n", "seeds", "accuracies" (in seed order), "wall_s", "cpu_s"} of a list of
    (seed, accuracy, wall, cpu) runs."""
    runs = sorted(runs)
    accs = np.array([a for _, a, _, _ in runs])
    return {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "n": len(accs),
            "seeds": [seed for seed, _, _, _ in runs], "accuracies": accs.tolist(),
            "wall_s": float(np.mean([r[2] for r in runs])), "cpu_s": float(np.mean([r[3] for r in runs]))}


def agreement(a, b):
    """The issue's check of route a against route b: {"difference" of means a - b, its "bound",
    "within_noise"}: within noise when the difference is at most 2 standard errors of the difference
    or at most 0.5 points. Then the paired view of the same runs (every route of a seed starts from
    the same weights and sees the same batches): the per-seed differences' mean, its standard error
    and the two-sided p-value of a paired t-test ("paired"), which a route that tracks PyTorch
    closely makes sharp: it tells a systematic difference from the spread between seeds."""
    diff = a["mean"] - b["mean"]
    bound = max(2.0 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]), 0.5)
    check = {"difference": diff, "bound": bound, "within_noise": abs(diff) <= bound}
    by_seed = dict(zip(b["seeds"], b["accuracies"]))
    paired = np.array([acc - by_seed[seed] for seed, acc in zip(a["seeds"], a["accuracies"]) if seed in by_seed])
    if len(paired) > 1:
        se = float(paired.std(ddof=1) / math.sqrt(len(paired)))
        if se > 0:
            p = float(stats.ttest_1samp(paired, 0.0).pvalue)
        else:  # every seed the same difference
            p = 1.0 if paired[0] == 0 else 0.0
        check["paired"] = {"difference": float(paired.mean()), "se": se, "p": p, "n": len(paired)}
    return check


@functools.cache
def versions():
    """The versions every route ran with (stock onnxruntime: .venv-ort's, where it exists)."""
    stock = subprocess.run([str(ORT_PYTHON), "-c", "import onnxruntime; print(onnxruntime.__version__)"], capture_output=True,
                           text=True).stdout.strip() if ORT_PYTHON.exists() else None
    kdgraph = subprocess.run([str(kdgraph_bin()), "--version"], capture_output=True, text=True).stdout.strip()
    return {"kdgraph": kdgraph, "onnxruntime_training": onnxruntime.__version__, "onnxruntime_stock": stock,
            "torch": torch.__version__, "numpy": np.__version__}


def results(plan, teacher_acc, runs, notes, spent, load):
    """The JSON document: where it comes from (provenance, versions), configuration, whether every cell has every seed ("complete": false for a
    stopped run), teacher, time spent ((wall s, CPU s, jobs): the CPU time
    over the jobs is the run's time on an idle machine), the load average sampled after every
    job, and per student and method: each
    route's summary ("routes"), why a route did not run ("not_run"), and each kdgraph route against
    PyTorch ("against_torch", where both have more than one seed: one seed measures no spread)."""
    students = {}
    for (student, method, route), rs in runs.items():
        students.setdefault(student, {}).setdefault(method, {}).setdefault("routes", {})[route] = summary(rs)
    for (student, method, route), whys in notes.items():
        students.setdefault(student, {}).setdefault(method, {}).setdefault("not_run", {})[route] = sorted(set(whys))
    for methods in students.values():
        for entry in methods.values():
            routes = entry.get("routes", {})
            for route in ROUTES:
                if route != REFERENCE and min(routes.get(r, {"n": 0})["n"] for r in (route, REFERENCE)) > 1:
                    entry.setdefault("against_torch", {})[route] = agreement(routes[route], routes[REFERENCE])
    config = {"data": {"train": TRAIN, "test": TEST, "size": SIZE, "shift": SHIFT, "batch": BATCH},
              "teacher": TEACHER, "students": list(plan.students), "methods": list(plan.methods), "seeds": list(plan.seeds),
              "epochs": plan.epochs, "init_epochs": plan.init_epochs, "teacher_epochs": plan.teacher_epochs, "lr": LR,
              "optimizer": "AdamW (betas 0.9/0.999, eps 1e-6, no weight decay), cosine schedule to 0 per stage",
              "crd": {"n_data": TRAIN, "negatives": CRD_NEGATIVES}, "routes": ROUTE_NAMES, "threads_per_run": THREADS,
              "kdgraph": str(kdgraph_bin())}
    wall, cpu, jobs = spent
    expected = {(st, m, r) for st in plan.students for m in plan.methods for r in ROUTES}
    complete = all(len(runs.get(cell, ())) == len(plan.seeds) for cell in expected)
    return {**provenance(), "versions": versions(), "config": config, "complete": complete, "teacher_accuracy": teacher_acc, "total_wall_s": wall, "total_cpu_s": cpu,
            "idle_machine_estimate_s": cpu / jobs,
            "load_average_1min": {"mean": float(np.mean(load)), "min": float(min(load)), "max": float(max(load)),
                                  "samples": len(load)},
            "students": students}


def seeds_done(doc, student):
    """`n`, or `n of m` while a run is under way or stopped: the fewest seeds of any cell of `student`
    (counting a method not reached yet as none)."""
    methods = doc["students"][student]
    counts = [r["n"] for m in doc["config"]["methods"] for r in methods.get(m, {}).get("routes", {"-": {"n": 0}}).values()]
    n, m = min(counts), len(doc["config"]["seeds"])
    return str(n) if n == m and len(methods) == len(doc["config"]["methods"]) else f"{n} of {m}"


def cell(entry, route):
    """A table cell: mean ± std (CPU time per run), or why the route did not run."""
    s = entry.get("routes", {}).get(route)
    if s is None:
        return "not run" if route in entry.get("not_run", {}) else "-"
    return f"{s['mean']:.1f} ± {s['std']:.1f} ({s['cpu_s']:.0f} s)"


def paired_cell(paired):
    """The paired difference ± its SE, starred where the paired t-test's p is below PAIRED_P."""
    if paired is None:
        return "-"
    return f"{paired['difference']:+.1f} ± {paired['se']:.1f}{' *' if paired['p'] < PAIRED_P else ''}"


def markdown(doc):
    """The README table: per student, each route's accuracy (mean ± std over seeds, CPU time per
    run), each kdgraph route's difference from PyTorch against its noise bound, and each method's
    gain over the plain student per route."""
    lines = [f"Teacher {TEACHER}: {doc['teacher_accuracy']:.1f}%. Test accuracy (%), mean ± std over the seeds "
             f"(CPU time per run, one thread). Difference from PyTorch: each kdgraph route's difference of means "
             f"({', '.join(ROUTE_NAMES[r] for r in ROUTES if r != REFERENCE)}), its bound in parentheses (2 standard "
             f"errors of the difference, at least 0.5), MISS beyond it. Paired: the mean over seeds of the route's "
             f"accuracy minus PyTorch's from the same initial weights and batches, ± its standard error; * where a "
             f"paired t-test gives p < {PAIRED_P}.", ""]
    for student, methods in doc["students"].items():
        plain = methods.get(PLAIN, {}).get("routes", {})
        lines += [f"**{student}** ({seeds_done(doc, student)} seeds)", "",
                  "| method | " + " | ".join(ROUTE_NAMES[r] for r in ROUTES)
                  + " | difference from PyTorch (bound) | paired difference ± SE | gain over plain (same order) |",
                  "|---|" + "---|" * (len(ROUTES) + 3)]
        for method in [m for m in doc["config"]["methods"] if m in methods]:
            entry = methods[method]
            checks = entry.get("against_torch", {})
            agree = " / ".join(f"{c['difference']:+.1f} ({c['bound']:.1f}){'' if c['within_noise'] else ' MISS'}" if c else "-"
                               for c in (checks.get(r) for r in ROUTES if r != REFERENCE))
            paired = " / ".join(paired_cell(checks.get(r, {}).get("paired")) for r in ROUTES if r != REFERENCE)
            routes = entry.get("routes", {})
            gains = " / ".join(f"{routes[r]['mean'] - plain[r]['mean']:+.1f}" if r in routes and r in plain else "-" for r in ROUTES)
            lines.append(f"| {method} | {' | '.join(cell(entry, r) for r in ROUTES)} | {agree} | {paired} | "
                         f"{'' if method == PLAIN else gains} |")
        lines.append("")
    notes = sorted({why for methods in doc["students"].values() for e in methods.values()
                    for whys in e.get("not_run", {}).values() for why in whys})
    lines += [f"Not run: {why}" for why in notes]
    return "\n".join(lines)


def plot(doc, path):
    """Accuracy per method and route with error bars (std over seeds), one panel per student."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    students = doc["students"]
    width = 0.8 / len(ROUTES)
    fig, axes = plt.subplots(len(students), 1, figsize=(12, 3.8 * len(students)), squeeze=False)
    for ax, (student, methods) in zip(axes[:, 0], students.items()):
        names = [m for m in doc["config"]["methods"] if m in methods]
        for k, route in enumerate(ROUTES):
            shown = [(i, methods[m]["routes"][route]) for i, m in enumerate(names) if route in methods[m].get("routes", {})]
            ax.bar([i + (k - (len(ROUTES) - 1) / 2) * width for i, _ in shown], [s["mean"] for _, s in shown], width,
                   yerr=[s["std"] for _, s in shown], capsize=1.5, label=ROUTE_NAMES[route])
        ax.axhline(doc["teacher_accuracy"], color="k", linestyle="--", linewidth=1, label=f"teacher {TEACHER}")
        low = min(s["mean"] for m in names for s in methods[m].get("routes", {}).values())
        ax.set_ylim(max(0.0, low - 10.0), 110.0)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"student {student}: {seeds_done(doc, student)} seeds, {doc['config']['epochs']} epochs")
        ax.legend(loc="upper center", ncol=len(ROUTES) + 1, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc, out):
    """accuracy.json, accuracy.md and accuracy.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(doc) + "\n")
    plot(doc, out / "accuracy.png")


def benchmark(plan, workdir, out=None, jobs=1):
    """Trains the teacher, exports every student initialisation and writes every seed's data stream,
    then runs every (student, seed, method, route) Job in `jobs` processes, the first student's seeds first;
    the results document (written to `out` after every Job when given, so a stopped run leaves what
    it finished)."""
    start = time.perf_counter()
    train, test = digits()
    teacher_path, teacher, teacher_acc = train_teacher(train, test, plan.teacher_epochs, workdir)
    log(f"teacher {TEACHER}: {teacher_acc:.2f}% after {plan.teacher_epochs} epochs ({time.perf_counter() - start:.0f} s)")
    work = [Job(name, seed, method, route, plan, teacher_path, teacher.state_dict(), workdir)
            for name in plan.students for seed in plan.seeds for method in plan.methods for route in ROUTES]
    for job in work:
        if not student_file(job).exists():
            mf.export(build(job.student, 1000 + job.seed), student_file(job), "train")
        stream_file(train, plan.epochs, job.seed, stream_path(job))
    runs, notes, load, cpu_total = {}, {}, [os.getloadavg()[0]], cpu_seconds()
    with multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for student, method, route, seed, acc, wall, cpu, why in (pool.imap_unordered(run_job, work) if pool else map(run_job, work)):
            if why is None:
                runs.setdefault((student, method, route), []).append((seed, acc, wall, cpu))
                cpu_total += cpu
            else:
                notes.setdefault((student, method, route), []).append(why)
            load.append(os.getloadavg()[0])
            if out is not None:
                write(results(plan, teacher_acc, runs, notes, (time.perf_counter() - start, cpu_total, jobs), load), out)
    return results(plan, teacher_acc, runs, notes, (time.perf_counter() - start, cpu_total, jobs), load)


def quick_check(doc):
    """{route: (route - PyTorch, the bound)} of --quick's one run per route: twice the binomial
    standard error of the difference of two test accuracies on TEST images (one seed measures no
    spread over seeds)."""
    routes = doc["students"][QUICK.students[0]][QUICK.methods[0]]["routes"]
    ref = routes[REFERENCE]["mean"] / 100.0
    checks = {}
    for route in (r for r in ROUTES if r != REFERENCE):
        p = routes[route]["mean"] / 100.0
        checks[route] = (100.0 * (p - ref), 200.0 * math.sqrt((p * (1 - p) + ref * (1 - ref)) / TEST))
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one method (kd), one seed, a few epochs, resnet8 only")
    parser.add_argument("--out", type=Path, help=f"where the results go (default: {RESULTS.relative_to(ROOT)}; --quick: none)")
    parser.add_argument("--epochs", type=int, help=f"main-stage epochs (default {EPOCHS}; fewer: a reduced run)")
    parser.add_argument("--init-epochs", type=int, help=f"init-stage epochs of AB, FT, FSP (default {INIT_EPOCHS})")
    parser.add_argument("--teacher-epochs", type=int, help=f"the teacher's epochs (default {TEACHER_EPOCHS})")
    parser.add_argument("--students", nargs="+", choices=[n for n in NETS if n != TEACHER], help=f"students (default: {' '.join(STUDENTS)})")
    parser.add_argument("--methods", nargs="+", choices=(PLAIN,) + METHODS, help="methods (default: plain and all 14)")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"seeds (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--jobs", type=int, default=2, help="routes trained at once (default: 2, the cores)")
    parser.add_argument("--workdir", type=Path, help="where models and graphs go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    plan, out = (QUICK, args.out) if args.quick else (FULL, args.out or RESULTS)
    sizes = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
             if k in ("epochs", "init_epochs", "teacher_epochs", "students", "methods", "seeds") and v is not None}
    plan = dataclasses.replace(plan, **sizes)
    if plan.init_epochs > plan.epochs:
        parser.error("--init-epochs must not exceed --epochs (an init stage trains on the first batches of the main stage's stream)")
    with tempfile.TemporaryDirectory(prefix="kdgraph-accuracy-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        doc = benchmark(plan, workdir, out, args.jobs)
    if not args.quick:
        log(markdown(doc))
        return 0
    missing = doc["students"][QUICK.students[0]][QUICK.methods[0]].get("not_run")
    if missing:
        log(f"quick: routes did not run: {missing}")
        return 1
    doc["quick"] = {route: {"difference": diff, "bound": bound, "within_noise": abs(diff) <= bound}
                    for route, (diff, bound) in quick_check(doc).items()}
    if out is not None:
        write(doc, out)
    for route, check in doc["quick"].items():
        log(f"quick: {ROUTE_NAMES[route]} - PyTorch = {check['difference']:+.2f} points (bound {check['bound']:.2f})")
    return 0 if all(c["within_noise"] for c in doc["quick"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
