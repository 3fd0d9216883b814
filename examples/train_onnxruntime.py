"""Train a graph written by `kdgraph merge --emit step` on stock onnxruntime: no training build."""

# Command line (numpy, onnx and onnxruntime; onnxruntime-gpu for --device cuda):
#     python examples/train_onnxruntime.py joint.json --data train.npz [--val val.npz]
#         [--steps S | --epochs E] [--batch 64] [--lr 1e-3] [--schedule constant|cosine|step]
#         [--seed 0 | --no-shuffle] [--device cpu|cuda] [-o student.onnx] [--log losses.jsonl]
#
# The same loop as `kdgraph train`, on onnxruntime's InferenceSession: the step graph
# (`joint.step.onnx`: forward, backward and the optimizer's update in one graph) takes the batch,
# the labels, every carried value (parameters, optimizer moments, BatchNorm running statistics),
# `lr` and, for AdamW, `step`; it returns the loss terms and each carried value's next value as
# `<name>_next`. The sidecar's `step.carried` lists them.
#
# Batches are kdgraph train's: the same seeded shuffle (splitmix64, Fisher-Yates), the last partial
# batch of an epoch dropped, the same schedules, so the two trainers' logs agree step by step;
# --no-shuffle (both trainers) takes the batches in the file's order instead.
# The init stage (AB, FT, FSP) trains first where the sidecar lists one; its trained parameters
# and statistics start the main stage (by name).
#
# CRD: its memory banks and Z are carried like the parameters (initialised as kdgraph train does,
# from the seed), and each step feeds the batch's sample indices and contrast indices (the sample,
# then negatives of other classes) drawn as kdgraph train draws them (src/train/crd.rs), so the
# two trainers feed CRD the same values. The data set must hold the merge's --crd-n-data samples:
# its rows, or, where the file gives `id` (one int64 per row: several augmented views of one
# sample share its id), the ids 0..N-1; CRD keeps one memory row per sample id.
#
# Device: every carried value lives in one of two buffer sets on the device (OrtValues); the step
# reads one set and writes the other through IOBinding, and the sets swap after each step, so the
# parameters never travel to the host during training: only the batch goes in and the scalar
# losses come out. The same code runs on the CPU (buffers in host memory).
#
# At the end: the trained student (the student's nodes of the joint graph, its trained weights
# and running statistics as initializers) to -o, and every carried value to `<-o>.ckpt.npz` in
# kdgraph train's checkpoint format.

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

CHECKPOINT_KEYS = ("stage", "step", "epoch", "shuffle_state", "batch", "samples")
MASK64 = (1 << 64) - 1


class TrainingError(ValueError):
    """A refusal printed as one `error:` line (bad data, a graph and sidecar that do not match)."""


# --------------------------------------------------------------------------- sidecar


_HASH_K1 = np.uint64(0x9E3779B97F4A7C15)
_HASH_K2 = np.uint64(0xC2B2AE3D27D4EB4F)


def content_hash(data):
    """kdgraph's fingerprint of a file's bytes (src/onnx/io.rs `content_hash`)."""
    data = bytes(data)
    words = np.frombuffer(data + b"\0" * (-len(data) % 8), dtype="<u8").astype(np.uint64)
    index = np.arange(len(words), dtype=np.uint64)
    value = int(np.bitwise_xor.reduce((words * _HASH_K1) ^ (index * _HASH_K2))) if len(words) else 0
    return f"{value:016x}-{len(data)}"


def checked_file(path, recorded, sidecar_path):
    """`path`, refused when its hash is not the one its sidecar records."""
    if content_hash(path.read_bytes()) != recorded:
        raise TrainingError(f"`{path}` and `{sidecar_path}` come from different merges; run kdgraph merge again")
    return path


def read_stage(sidecar_path):
    """A stage's sidecar with `joint_path` and `step_path` added (both hash-checked)."""
    sidecar_path = Path(sidecar_path).with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    if "step" not in sidecar:
        raise TrainingError(f"`{sidecar_path}` lists no step graph; run `kdgraph merge ... --emit step`")
    folder = sidecar_path.parent
    sidecar["joint_path"] = checked_file(folder / sidecar["model"], sidecar["model_hash"], sidecar_path)
    sidecar["step_path"] = checked_file(folder / sidecar["step"]["model"], sidecar["step"]["model_hash"], sidecar_path)
    crd = Crd.of(sidecar)
    fed = {"image", "labels"}
    for role in sidecar["inputs"]:
        if role["role"] not in fed and not (crd and role["name"] in crd.inputs()):
            raise TrainingError(f"`{sidecar['joint_path']}` takes an input `{role['name']}` ({role['role']}) that this "
                                "trainer does not know how to feed; train it with examples/train_ort.py")
    return sidecar


def read_stages(sidecar_path):
    """Every stage's sidecar, in training order (the main stage last)."""
    main = read_stage(sidecar_path)
    folder = Path(sidecar_path).parent
    others = [read_stage(folder / s["sidecar"]) for s in main["stages"] if s["name"] != main["stage"]]
    return others + [main]


def role(sidecar, name):
    return next(r for r in sidecar["inputs"] + sidecar["outputs"] if r["role"] == name)


# --------------------------------------------------------------------------- data


class Data:
    """Images `x`, labels `y`, each row's sample id `ids`, and each sample's label by id."""

    def __init__(self, x, y, ids, sample_labels):
        self.x, self.y, self.ids, self.sample_labels = x, y, ids, sample_labels


def sample_ids(path, ids, y):
    """The optional `id` array, checked as kdgraph train does: (ids, each sample's label by id)."""
    if ids is None:
        return np.arange(len(y)), y
    if ids.dtype != np.int64 or ids.shape != y.shape:
        raise TrainingError(f"`{path}`: array `id` is {ids.dtype} of shape {list(ids.shape)}; save one sample id per image "
                            f"as int64, shape ({len(y)},)")
    if len(ids) and ids.min() < 0:
        row = int(np.flatnonzero(ids < 0)[0])
        raise TrainingError(f"`{path}`: id[{row}] = {ids[row]} is negative; number the samples 0, 1, 2, ...")
    labels = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
    for row, (sample, label) in enumerate(zip(ids, y)):
        if labels[sample] not in (-1, label):
            raise TrainingError(f"`{path}`: id[{row}] = {sample} is labelled {label}, but an earlier row of sample "
                                f"{sample} is labelled {labels[sample]}; one sample id, one label")
        labels[sample] = label
    missing = np.flatnonzero(labels < 0)
    if len(missing):
        raise TrainingError(f"`{path}`: no row has id {missing[0]}, but ids go up to {len(labels) - 1}; number the "
                            f"samples 0..M without gaps")
    return ids, labels


def load_data(path, image_dims, classes, batch):
    """`x` (N, C, H, W) float32, `y` (N,) int64 and optionally `id` (N,) int64 from an .npz, checked
    as kdgraph train does: a Data."""
    try:
        arrays = np.load(path)
    except OSError as exc:
        raise TrainingError(f"cannot read `{path}`: {exc}") from exc
    for name in ("x", "y"):
        if name not in arrays.files:
            raise TrainingError(f"`{path}` has no array `{name}`; save images as `x` and labels as `y`")
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.float32:
        raise TrainingError(f"`{path}`: array `x` is {x.dtype}, not float32; save it as x.astype(np.float32)")
    if x.ndim != 4 or list(x.shape[1:]) != list(image_dims):
        raise TrainingError(f"`{path}`: array `x` has shape {list(x.shape)}, but the graph takes images of (N, {', '.join(map(str, image_dims))})")
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise TrainingError(f"`{path}`: array `y` must be int64 of shape ({len(x)},); it is {y.dtype} {list(y.shape)}")
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if len(bad):
        raise TrainingError(f"`{path}`: label y[{bad[0]}] = {y[bad[0]]} is outside 0..{classes}")
    if len(y) < max(batch, 1):
        raise TrainingError(f"`{path}` holds {len(y)} samples, fewer than one batch of {batch}")
    return Data(x, y, *sample_ids(path, arrays["id"] if "id" in arrays.files else None, y))


GOLDEN = 0x9E3779B97F4A7C15


def mix(z):
    """splitmix64's output function, on a Python int or elementwise on a uint64 array (which wraps)."""
    if isinstance(z, np.ndarray):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream(state, first, count):
    """Outputs `first` .. `first + count - 1` (0 first) of the splitmix64 stream seeded `state`, as uint64."""
    k = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix(np.uint64(state & MASK64) + k * np.uint64(GOLDEN))


class Shuffle:
    """kdgraph train's seeded shuffle: splitmix64 driving a Fisher-Yates permutation."""

    def __init__(self, state):
        self.state = state & MASK64

    def next(self):
        self.state = (self.state + GOLDEN) & MASK64
        return mix(self.state)

    def order(self, count):
        order = list(range(count))
        for i in range(count - 1, 0, -1):
            j = self.next() % (i + 1)
            order[i], order[j] = order[j], order[i]
        return order


def rate(kind, base, steps, step):
    """The learning rate of step `step` (1 first), as kdgraph train's schedules."""
    done, total = step - 1, max(steps, 1)
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * done / total))
    if kind == "step":
        return base * 0.1 ** sum(done >= f * total for f in (5 / 8, 6 / 8, 7 / 8))
    return base


class Crd:
    """CRD's inputs, as kdgraph train makes them (src/train/crd.rs): memory banks and Z carried from
    step to step, the batch's sample indices, and contrast indices (the sample, then K negatives of
    other classes without replacement: the K of the smallest keys in a seeded stream per row)."""

    INDEX, CONTRAST = "kd/crd/index", "kd/crd/contrast_index"
    MEMORIES, Z = ("kd/crd/memory_student", "kd/crd/memory_teacher"), "kd/crd/z"
    MEMORY_STREAM, CONTRAST_STREAM = 0x6D656D6F7279, 0x636F6E7472617374

    def __init__(self, n_data, negatives, feat_dim, seed):
        self.n_data, self.negatives, self.feat_dim, self.seed = n_data, negatives, feat_dim, seed & MASK64

    @classmethod
    def of(cls, sidecar, seed=0):
        """CRD's sizes from the shapes of its inputs in a stage's sidecar (None: no CRD there)."""
        shapes = {r["name"]: r["shape"] for r in sidecar["inputs"]}
        if cls.MEMORIES[0] not in shapes:
            return None
        n_data, feat_dim = shapes[cls.MEMORIES[0]]
        return cls(n_data, shapes[cls.CONTRAST][-1] - 1, feat_dim, seed)

    def inputs(self):
        return {self.INDEX, self.CONTRAST, *self.MEMORIES, self.Z}

    def check_data(self, path, y):
        if len(y) != self.n_data:
            raise TrainingError(f"`{path}` holds {len(y)} samples, but CRD's memory banks hold {self.n_data} (merge "
                                f"--crd-n-data); merge again with --crd-n-data {len(y)}")
        if np.all(y == y[0]):
            raise TrainingError(f"`{path}`: every sample is of class {y[0]}, but CRD draws its negatives from other classes")

    def state(self):
        """The carried entries of the memories and Z (no initializers: not passed on, not exported)."""
        dims = {self.MEMORIES[0]: [self.n_data, self.feat_dim], self.MEMORIES[1]: [self.n_data, self.feat_dim], self.Z: [2]}
        return [{"input": n, "output": n + "_next", "initial": "zeros", "dims": d} for n, d in dims.items()]

    def initial_state(self):
        """The memories, student's then teacher's from one stream, bound * (2u - 1) in float32 with u
        the top 24 bits over 2^24 and bound = 1 / sqrt(dim / 3); Z = -1 (estimated on the first batch)."""
        count = self.n_data * self.feat_dim
        u = (stream(self.seed ^ self.MEMORY_STREAM, 0, 2 * count) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
        bound = np.float32(1) / np.sqrt(np.float32(self.feat_dim) / np.float32(3))
        values = bound * (np.float32(2) * u - np.float32(1))
        shape = (self.n_data, self.feat_dim)
        return {self.MEMORIES[0]: values[:count].reshape(shape), self.MEMORIES[1]: values[count:].reshape(shape),
                self.Z: np.array([-1, -1], np.float32)}

    def contrast_index(self, y, indices, step):
        """(B, K + 1) int64: each sample, then its negatives (step `step`, 1 first)."""
        k, rows = self.negatives, []
        base = mix(((self.seed ^ self.CONTRAST_STREAM) + step) & MASK64)
        for row, sample in enumerate(indices):
            row_state = mix((base + row) & MASK64)
            pool = np.flatnonzero(y != y[sample])
            if len(pool) >= k:
                keys = stream(row_state, 0, len(y))[pool]
                chosen = np.argpartition(keys, k - 1)[:k] if len(pool) > k else np.arange(k)
                negatives = pool[chosen[np.argsort(keys[chosen])]]
            else:  # with replacement, as RepDistiller when fewer samples are of other classes than K
                negatives = pool[(stream(row_state, 0, k) % np.uint64(len(pool))).astype(np.int64)]
            rows.append(np.concatenate([[sample], negatives]))
        return np.array(rows, np.int64)


# --------------------------------------------------------------------------- the step on a device


class StepRunner:
    """The step graph in an InferenceSession, its carried values in two buffer sets on `device`
    that swap after every step (IOBinding: nothing is copied to the host but the losses)."""

    def __init__(self, sidecar, carried, values, fixed, device="cpu"):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TrainingError("--device cuda needs onnxruntime-gpu (pip install onnxruntime-gpu)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(step_model(sidecar, fixed), options, providers=providers)
        self.device = device
        self.carried = carried
        self.terms = [o["name"] for o in sidecar["outputs"] if o["role"] in ("loss", "term")]
        self.image = role(sidecar, "image")["name"]
        self.inputs = {i.name for i in self.session.get_inputs()}
        # A copy: on the CPU an OrtValue wraps the array's memory, which the steps then overwrite.
        on_device = lambda array: ort.OrtValue.ortvalue_from_numpy(np.array(array, np.float32, copy=True), device, 0)
        self.current = [on_device(values[c["input"]]) for c in self.carried]
        self.spare = [ort.OrtValue.ortvalue_from_shape_and_type(c["dims"], np.float32, device, 0) for c in self.carried]

    def step(self, x, y, lr, step, crd_feeds=None):
        """One step on a batch (and CRD's index inputs by name): the loss terms by name. The
        carried values stay on the device."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.image, x)
        if "labels" in self.inputs:
            binding.bind_cpu_input("labels", y)
        for name, value in (crd_feeds or {}).items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("lr", np.array(lr, np.float32))
        if "step" in self.inputs:
            binding.bind_cpu_input("step", np.array(step, np.int64))
        for c, now, then in zip(self.carried, self.current, self.spare):
            binding.bind_ortvalue_input(c["input"], now)
            binding.bind_ortvalue_output(c["output"], then)
        for name in self.terms:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        terms = {name: float(outputs[len(self.carried) + i].numpy()) for i, name in enumerate(self.terms)}
        self.current, self.spare = self.spare, self.current
        return terms

    def values(self):
        """Every carried value, copied to the host, by input name (on the CPU, numpy() is a view of
        memory the runner frees, hence the copy)."""
        return {c["input"]: value.numpy().copy() for c, value in zip(self.carried, self.current)}


def step_model(sidecar, fixed):
    """The step graph (its path, or its bytes with `fixed` written over its initializers: what an
    earlier stage trained and this one keeps frozen, such as FT's paraphraser)."""
    if not fixed:
        return str(sidecar["step_path"])
    model = onnx.load(str(sidecar["step_path"]))
    for tensor in model.graph.initializer:
        if tensor.name in fixed:
            tensor.CopyFrom(numpy_helper.from_array(fixed[tensor.name], tensor.name))
    return model.SerializeToString()


# --------------------------------------------------------------------------- the student


def initial_values(sidecar, carried, carried_over):
    """The first step's carried values: a previous stage's by name (or CRD's first state), else the
    joint graph's initializers, zeros for the optimizer's moments."""
    inits = {t.name: t for t in onnx.load(str(sidecar["joint_path"])).graph.initializer}
    values = {}
    for c in carried:
        if c["input"] in carried_over and list(carried_over[c["input"]].shape) == c["dims"]:
            values[c["input"]] = carried_over[c["input"]]
        elif c["initial"] == "initializer":
            values[c["input"]] = numpy_helper.to_array(inits[c["input"]]).astype(np.float32)
        else:
            values[c["input"]] = np.zeros(c["dims"], np.float32)
    return values


def export_student(sidecar, values, path):
    """The student's nodes of the joint graph (those its outputs need), with `values` as its
    initializers, the image as its only input."""
    model = onnx.load(str(sidecar["joint_path"]))
    graph = model.graph
    outputs = {o["name"] for o in sidecar["outputs"] if o["role"] == "student"}
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in needed]
    read = {i for n in kept for i in n.input}
    inits = [numpy_helper.from_array(values[t.name], t.name) if t.name in values else t
             for t in graph.initializer if t.name in read]
    image = role(sidecar, "image")["name"]
    student = onnx.helper.make_graph(kept, "student", [i for i in graph.input if i.name == image],
                                     [o for o in graph.output if o.name in outputs], inits)
    exported = onnx.helper.make_model(student, opset_imports=model.opset_import, ir_version=model.ir_version,
                                      producer_name="kdgraph train_onnxruntime.py")
    onnx.save(exported, str(path))


def save_checkpoint(path, values, progress):
    """Every carried value and the progress, in kdgraph train's checkpoint format (atomically)."""
    arrays = dict(values)
    # int64 scalars; the shuffle's 64-bit state keeps its bits.
    arrays.update({f"kdgraph:{k}": np.array(progress[k], np.uint64).view(np.int64) for k in CHECKPOINT_KEYS})
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


# --------------------------------------------------------------------------- the loop


def accuracy(student_path, x, y, batch):
    session = ort.InferenceSession(str(student_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(y), batch):
        logits = session.run(None, {name: x[start:start + batch]})[0]
        correct += int((logits.argmax(axis=1) == y[start:start + batch]).sum())
    return correct / len(y)


def stage_steps(args, sidecar, is_main, per_epoch):
    if not is_main and args.init_steps:
        return args.init_steps
    if args.steps:
        return args.steps
    if is_main:
        return (args.epochs or 1) * per_epoch
    prescribed = next((s["epochs"] for s in sidecar["stages"] if s["name"] == sidecar["stage"]), None)
    return (prescribed or args.epochs or 1) * per_epoch


def train_stage(args, index, sidecar, is_main, carried_over, data, log):
    x, y = data.x, data.y
    per_epoch = len(y) // args.batch
    steps = stage_steps(args, sidecar, is_main, per_epoch)
    crd = Crd.of(sidecar, args.seed)
    # What the step reads and writes back: the step graph's carried values, then CRD's state.
    carried = sidecar["step"]["carried"] + (crd.state() if crd else [])
    names = {c["input"] for c in carried}
    fixed = {name: value for name, value in carried_over.items() if name not in names}
    start = {**carried_over, **(crd.initial_state() if crd else {})}
    runner = StepRunner(sidecar, carried, initial_values(sidecar, carried, start), fixed, args.device)
    shuffle, order, since = Shuffle(args.seed + index), None, time.perf_counter()
    for step in range(1, steps + 1):
        epoch, position = divmod(step - 1, per_epoch)
        if position == 0:
            epoch_start = shuffle.state
            order = list(range(per_epoch * args.batch)) if args.no_shuffle else shuffle.order(per_epoch * args.batch)
        indices = order[position * args.batch:(position + 1) * args.batch]
        lr = rate(args.schedule, args.lr, steps, step)
        samples = data.ids[indices]
        crd_feeds = {Crd.INDEX: samples.astype(np.int64), Crd.CONTRAST: crd.contrast_index(data.sample_labels, samples, step)} if crd else None
        terms = runner.step(x[indices], y[indices], lr, step, crd_feeds)
        if log:
            log.write(json.dumps({"stage": sidecar["stage"], "step": step, "epoch": epoch + 1, "lr": lr,
                                  "indices": indices, **terms}) + "\n")
        if step % args.log_every == 0 or step == steps:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in terms.items())
            images = args.log_every * args.batch if step % args.log_every == 0 else (step % args.log_every) * args.batch
            print(f"{sidecar['stage']} step {step}/{steps} epoch {epoch + 1}  {shown}  lr {lr:.3e}  "
                  f"{images / (time.perf_counter() - since):.1f} images/s", flush=True)
            since = time.perf_counter()
    values = {**runner.values(), **fixed}  # a checkpoint holds the fixed values too
    # As kdgraph train records it: the shuffle's state at the start of the epoch of the next step.
    resume_state = shuffle.state if steps % per_epoch == 0 else epoch_start
    progress = {"stage": index, "step": steps, "epoch": steps // per_epoch, "shuffle_state": resume_state,
                "batch": args.batch, "samples": len(y)}
    return values, progress


def train(args):
    stages = read_stages(args.sidecar)
    main = stages[-1]
    image_dims = role(main, "image")["shape"][1:]
    classes = next(r["index_bound"] for r in main["inputs"] if r["role"] == "labels")
    data = load_data(args.data, image_dims, classes, args.batch)
    for crd in filter(None, (Crd.of(sidecar) for sidecar in stages)):
        crd.check_data(args.data, data.sample_labels)
    val = load_data(args.val, image_dims, classes, 1) if args.val else None
    output = Path(args.output)
    log = open(args.log, "w") if args.log else None
    carried_over = {}
    try:
        for index, sidecar in enumerate(stages):
            is_main = index == len(stages) - 1
            values, progress = train_stage(args, index, sidecar, is_main, carried_over, data, log)
            carried_over = {c["input"]: values[c["input"]] for c in sidecar["step"]["carried"] if c["initial"] == "initializer"}
    finally:
        if log:
            log.close()
    save_checkpoint(output.with_suffix(".ckpt.npz"), values, progress)
    export_student(main, carried_over, output)
    if val is not None:
        print(f"validation accuracy {100 * accuracy(output, val.x, val.y, args.batch):.2f}% ({len(val.y)} images)")
    print(f"wrote {output}; checkpoint {output.with_suffix('.ckpt.npz')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sidecar", help="the main stage's sidecar (joint.json) of `kdgraph merge --emit step`")
    parser.add_argument("--data", required=True, help=".npz with x (N, C, H, W) float32 and y (N,) int64")
    parser.add_argument("--val", help="validation .npz (same layout): accuracy of the trained student")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=int)
    parser.add_argument("--init-steps", type=int, help="steps of the init stage (default: --steps, else its prescribed epochs)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=["constant", "cosine", "step"], default="constant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shuffle", action="store_true", help="batches in the data file's order, every epoch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("-o", "--output", default="student.onnx")
    parser.add_argument("--log", help="every step's losses, learning rate and batch as JSON lines")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    try:
        train(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
