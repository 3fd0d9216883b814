"""Test accuracy of students distilled through kdgraph against the same distillation in PyTorch, on scikit-learn's digits."""

# Run (--quick: one method, one seed, about 80 s alone on the machine, 150 s beside the full run):
#     .venv/bin/python bench/accuracy.py            # writes bench/results/accuracy.{json,md,png}
#     .venv/bin/python bench/accuracy.py --quick    # what tests/python/test_accuracy_quick.py runs
#
# Data: scikit-learn's bundled handwritten digits (1,797 8x8 gray images, 10 classes), resized to
# 32x32 (bilinear: the fixture networks are CIFAR networks, built for 32x32), the gray channel
# replicated to 3 (the fixture networks unchanged), normalised by the training split's mean and
# std. A fixed stratified test split of TEST = 600 images (binomial standard error about 1 point
# at 90%, so that differences of a couple of points between methods are visible), and a
# deliberately small stratified training split of TRAIN = 300 images (30 per class) drawn from
# the rest: with that little data the teacher's knowledge has room to matter, and every run is
# short. Augmentation: random shifts of up to SHIFT = 3 pixels (zero-filled), drawn per seed and
# epoch and precomputed as arrays, so every route sees the same images in the same order.
#
# Models (fixtures/make_fixtures.py, 10 classes): teacher resnet20 (RepDistiller's CIFAR
# ResNet), trained here in PyTorch to convergence and exported in eval mode with its BatchNorms;
# students resnet8 (same family, RepDistiller's resnet8) and mobile_half (MobileNetV2 x0.5,
# another family), exported in training mode. The larger fixtures (resnet32x4, ShuffleV2) would
# not fit the time budget on two cores. Per seed, one student initialisation, shared by every
# route (the ONNX export and the PyTorch module are the same weights).
#
# Routes: ORT Training (examples/train_ort.py's Stage on the graph of `kdgraph merge`) and
# PyTorch (the same modules, the graph's own connector initialisations, kd_reference's losses).
# Optimizer: AdamW, the only one train_ort.Stage offers, as ORT Training's artifacts build it
# (betas 0.9/0.999, eps 1e-6, no weight decay, bias correction; ORT's "hf" mode puts eps inside
# the bias correction, a difference of order 1e-6 in the step), cosine learning rate from LR to
# 0 over each stage; the init stage of AB, FT and FSP runs INIT_EPOCHS first and its parameters
# carry into the main stage by name. CRD: N = TRAIN memory rows and K = CRD_NEGATIVES negatives
# from other classes (RepDistiller's K/N = 16384/50000, scaled), memories initialised as
# train_ort.crd_state does, contrast indices drawn once per seed and fed to both routes.
# Cross-family FSP needs --fsp-connectors (the reference FSP pairs equal channel counts only).
#
# Time: each run is one thread (--jobs processes at once, default 2). Measured beside other jobs
# on the project's 2-core machine (load average 8-9): a resnet8 run of EPOCHS = 8 takes 30-50 s
# per route, about 0.75 s a step; alone, 0.28 s a step (--quick), so the whole run (teacher,
# 2 students x 15 configurations x 2 routes x 3 seeds) extrapolates to about 35 minutes on the
# idle machine. mobile_half takes about 1.8 times resnet8's time per step, and at 8 epochs it is
# far from converged: its numbers compare the routes, not the methods.

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from conftest import find_kdgraph_bin, mf  # noqa: E402  (conftest puts examples/ on the path)
import kd_reference as R  # noqa: E402
import train_ort  # noqa: E402
from merge_checks import PREACT_METHODS, Joint, pick_feat  # noqa: E402
from test_merge_stages import GraphParams  # noqa: E402

CLASSES, SIZE, CHANNELS = 10, 32, 3
TEST, TRAIN, SHIFT, BATCH = 600, 300, 3, 50
LR = 3e-3
EPOCHS, INIT_EPOCHS, TEACHER_EPOCHS = 8, 3, 40  # the budget: see the timing note at the top
SEEDS = (0, 1, 2)
CRD_NEGATIVES = 100
METHODS = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "ofd")
PLAIN = "plain"  # the student alone, cross-entropy
ROUTES = ("ort", "torch")
ROUTE_NAMES = {"ort": "ORT Training", "torch": "PyTorch"}
TEACHER = "resnet20"
STUDENTS = ("resnet8", "mobile_half")
RESULTS = ROOT / "bench" / "results"

mf.NUM_CLASSES = CLASSES  # the fixture builders read it when they build the classifier
NETS = {"resnet20": mf.BUILDERS["resnet20"], "resnet8": lambda: mf.ResNet(8, (16, 16, 32, 64)),
        "mobile_half": mf.BUILDERS["mobile_half"]}
log = train_ort.print_now
THREADS = 1  # per run: more threads than free cores slow PyTorch tenfold on a shared machine


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
    """A fresh `name` with 10 classes, initialised from `seed` (torch's default initialisation)."""
    torch.manual_seed(seed)
    return NETS[name]()


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
    other family's student, stage ends paired by resolution (by position, resnet20's 32x32 map would
    meet mobile_half's 8x8) and FSP's connectors (the channel counts differ)."""
    if method == PLAIN:
        return ["-m", "kd", "--alpha", "0", "--gamma", "1"]
    args = ["-m", method]
    if method == "crd":
        args += ["--crd-n-data", str(TRAIN), "--crd-negatives", str(CRD_NEGATIVES)]
    if student != "resnet8":  # another family: stage ends of equal size, FSP's connectors
        args += ["--pairing", "resolution"] + (["--fsp-connectors"] if method == "fsp" else [])
    return args


def merge(teacher_path, student_path, method, student, out_dir):
    """Runs `kdgraph merge`; the main stage's sidecar path."""
    kdgraph, why = find_kdgraph_bin()
    if kdgraph is None:
        raise SystemExit(why)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "joint.onnx"
    cmd = [str(kdgraph), "merge", str(teacher_path), str(student_path), "-o", str(out), "--no-check",
           *merge_args(method, student)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr}")
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
            bns = [self.teacher.get_submodule(p["teacher_module"]) for p in pairs]
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
QUICK = Plan(("resnet8",), ("kd",), (0,), 8, 2, 8)


def run_route(route, sidecar, model, teacher, train, test, seed, plan, workdir):
    """(test accuracy %, wall seconds) of one route's training of a copy of `model`."""
    start = time.perf_counter()
    if route == "ort":
        acc = run_ort(sidecar, train, test, seed, plan.epochs, plan.init_epochs, workdir)
    else:
        acc = run_torch(sidecar, copy.deepcopy(model), teacher, train, test, seed, plan.epochs, plan.init_epochs)
    return acc, time.perf_counter() - start


def run_student(name, seed, plan, teacher_path, teacher, train, test, workdir, record):
    """Every method and route on one initialisation of student `name`; record(student, method, route, acc, wall)."""
    model = build(name, 1000 + seed)
    student_path = workdir / f"{name}-{seed}.onnx"
    mf.export(model, student_path, "train")
    for method in plan.methods:
        sidecar = merge(teacher_path, student_path, method, name, workdir / f"{name}-{seed}-{method}")
        for route in ROUTES:
            acc, wall = run_route(route, sidecar, model, teacher, train, test, seed, plan, workdir / f"{name}-{seed}-{method}-{route}")
            log(f"{name} seed {seed} {method:7s} {ROUTE_NAMES[route]:13s} {acc:6.2f}%  {wall:6.1f} s")
            record(name, method, route, acc, wall)


def summary(runs):
    """{"mean", "std", "n", "accuracies", "wall_s"} of a list of (accuracy, wall) runs."""
    accs = np.array([a for a, _ in runs])
    return {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "n": len(accs),
            "accuracies": accs.tolist(), "wall_s": float(np.mean([w for _, w in runs]))}


def agreement(a, b):
    """(difference of means a - b, its bound, within): within noise when the difference is at most
    2 standard errors of the difference or at most 0.5 points."""
    diff = a["mean"] - b["mean"]
    bound = max(2.0 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]), 0.5)
    return diff, bound, abs(diff) <= bound


def results(plan, teacher_acc, runs, total_s):
    """The JSON document: configuration, teacher, and per student, method and route the summary."""
    students = {}
    for (student, method, route), rs in runs.items():
        students.setdefault(student, {}).setdefault(method, {})[route] = summary(rs)
    for methods in students.values():
        for routes in methods.values():
            if set(ROUTES) <= set(routes) and min(routes[r]["n"] for r in ROUTES) > 1:  # one seed: no spread
                diff, bound, ok = agreement(routes["ort"], routes["torch"])
                routes["ort_minus_torch"] = {"difference": diff, "bound": bound, "within_noise": ok}
    config = {"data": {"train": TRAIN, "test": TEST, "size": SIZE, "shift": SHIFT, "batch": BATCH},
              "teacher": TEACHER, "students": list(plan.students), "seeds": list(plan.seeds), "epochs": plan.epochs,
              "init_epochs": plan.init_epochs, "teacher_epochs": plan.teacher_epochs, "lr": LR,
              "optimizer": "AdamW (betas 0.9/0.999, eps 1e-6, no weight decay), cosine schedule",
              "crd": {"n_data": TRAIN, "negatives": CRD_NEGATIVES}, "routes": ROUTE_NAMES}
    return {"config": config, "teacher_accuracy": teacher_acc, "total_wall_s": total_s, "students": students}


def seeds_done(doc, student):
    """`n`, or `n of m` while a run is under way: the seeds that every cell of `student` has."""
    n = min(r["n"] for routes in doc["students"][student].values() for name, r in routes.items() if name in ROUTES)
    m = len(doc["config"]["seeds"])
    return str(n) if n == m else f"{n} of {m}"


def cell(s):
    """A table cell: mean ± std (wall time per run)."""
    return f"{s['mean']:.1f} ± {s['std']:.1f} ({s['wall_s']:.0f} s)"


def markdown(doc):
    """The README table: per student, each route's accuracy (mean ± std over seeds, wall time per
    run), whether ORT Training agrees with PyTorch, and each method's gain over the plain student."""
    lines = [f"Teacher {TEACHER}: {doc['teacher_accuracy']:.1f}%. Test accuracy (%), mean ± std over the seeds "
             f"(wall time per run).", ""]
    for student, methods in doc["students"].items():
        plain = methods.get(PLAIN, {})
        lines += [f"**{student}** ({seeds_done(doc, student)} seeds)", "", "| method | ORT Training | PyTorch | ORT - PyTorch (bound) | gain over plain (ORT / PyTorch) |",
                  "|---|---|---|---|---|"]
        for method, routes in methods.items():
            check = routes.get("ort_minus_torch")
            agree = "-" if check is None else f"{check['difference']:+.1f} ({check['bound']:.1f}) {'ok' if check['within_noise'] else 'MISS'}"
            gains = " / ".join(f"{routes[r]['mean'] - plain[r]['mean']:+.1f}" if r in routes and r in plain else "-" for r in ROUTES)
            lines.append(f"| {method} | {' | '.join(cell(routes[r]) if r in routes else '-' for r in ROUTES)} | {agree} | "
                         f"{'' if method == PLAIN else gains} |")
        lines.append("")
    return "\n".join(lines)


def plot(doc, path):
    """Accuracy per method and route with error bars (std over seeds), one panel per student."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    students = doc["students"]
    fig, axes = plt.subplots(len(students), 1, figsize=(11, 3.6 * len(students)), squeeze=False)
    for ax, (student, methods) in zip(axes[:, 0], students.items()):
        names = list(methods)
        for k, route in enumerate(ROUTES):
            xs = [i + (k - 0.5) * 0.38 for i, m in enumerate(names) if route in methods[m]]
            stats = [methods[m][route] for m in names if route in methods[m]]
            ax.bar(xs, [s["mean"] for s in stats], 0.38, yerr=[s["std"] for s in stats], capsize=2, label=ROUTE_NAMES[route])
        ax.axhline(doc["teacher_accuracy"], color="k", linestyle="--", linewidth=1, label=f"teacher {TEACHER}")
        low = min(methods[m][r]["mean"] for m in names for r in ROUTES if r in methods[m])
        ax.set_ylim(max(0.0, low - 10.0), 108.0)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"student {student}: {seeds_done(doc, student)} seeds, {doc['config']['epochs']} epochs")
        ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(doc, out):
    """accuracy.json, accuracy.md and accuracy.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(doc) + "\n")
    plot(doc, out / "accuracy.png")


def student_job(job):
    """One (student, seed) in a worker process: every method and route; [(student, method, route, acc, wall)]."""
    name, seed, plan, teacher_path, teacher_state, workdir = job
    torch.set_num_threads(THREADS)
    train, test = digits()
    teacher = build(TEACHER, 0)
    teacher.load_state_dict(teacher_state)
    records = []
    run_student(name, seed, plan, teacher_path, teacher, train, test, workdir, lambda *r: records.append(r))
    return records


def benchmark(plan, workdir, out=None, jobs=1):
    """Trains the teacher, then every student, seed, method and route, (student, seed) pairs in
    `jobs` processes, a student's seeds first; the results document (written to `out` as each pair
    finishes when given)."""
    start = time.perf_counter()
    train, test = digits()
    teacher_path, teacher, teacher_acc = train_teacher(train, test, plan.teacher_epochs, workdir)
    log(f"teacher {TEACHER}: {teacher_acc:.2f}% after {plan.teacher_epochs} epochs ({time.perf_counter() - start:.0f} s)")
    work = [(name, seed, plan, teacher_path, teacher.state_dict(), workdir) for name in plan.students for seed in plan.seeds]
    runs = {}
    with multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for records in (pool.imap_unordered(student_job, work) if pool else map(student_job, work)):
            for student, method, route, acc, wall in records:
                runs.setdefault((student, method, route), []).append((acc, wall))
            if out is not None:
                write(results(plan, teacher_acc, runs, time.perf_counter() - start), out)
    return results(plan, teacher_acc, runs, time.perf_counter() - start)


def quick_check(doc):
    """(ORT - PyTorch, the bound) of --quick's one run: twice the binomial standard error of the
    difference of two test accuracies on TEST images (one seed measures no spread over seeds)."""
    routes = doc["students"][QUICK.students[0]][QUICK.methods[0]]
    p = [routes[r]["mean"] / 100.0 for r in ROUTES]
    return 100.0 * (p[0] - p[1]), 200.0 * math.sqrt(sum(q * (1 - q) for q in p) / TEST)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one method (kd), one seed, a few epochs, resnet8 only")
    parser.add_argument("--out", type=Path, help=f"where the results go (default: {RESULTS.relative_to(ROOT)}; --quick: none)")
    parser.add_argument("--epochs", type=int, help=f"main-stage epochs (default {EPOCHS}; fewer: a reduced run)")
    parser.add_argument("--init-epochs", type=int, help=f"init-stage epochs of AB, FT, FSP (default {INIT_EPOCHS})")
    parser.add_argument("--teacher-epochs", type=int, help=f"the teacher's epochs (default {TEACHER_EPOCHS})")
    parser.add_argument("--jobs", type=int, default=2, help="(student, seed) pairs trained at once (default: 2, the cores)")
    parser.add_argument("--workdir", type=Path, help="where models and graphs go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    plan, out = (QUICK, args.out) if args.quick else (FULL, args.out or RESULTS)
    sizes = {k: v for k, v in vars(args).items() if k in ("epochs", "init_epochs", "teacher_epochs") and v is not None}
    plan = dataclasses.replace(plan, **sizes)
    with tempfile.TemporaryDirectory(prefix="kdgraph-accuracy-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        doc = benchmark(plan, workdir, out, 1 if args.quick else args.jobs)
    if not args.quick:
        log(markdown(doc))
        return 0
    diff, bound = quick_check(doc)
    doc["quick"] = {"difference": diff, "bound": bound, "within_noise": abs(diff) <= bound}
    if out is not None:
        write(doc, out)
    log(f"quick: ORT Training - PyTorch = {diff:+.2f} points (bound {bound:.2f})")
    return 0 if doc["quick"]["within_noise"] else 1


if __name__ == "__main__":
    sys.exit(main())
