"""Train a graph written by `kdgraph merge` with ONNX Runtime Training, stage by stage."""

# Command line:
#     python examples/train_ort.py joint.json [--steps 200] [--batch 64] [--device cuda] [--data data.npz]
# Reads the sidecar, trains the init stage first where there is one (AB, FSP, FT) and carries its
# trained parameters into the main stage by name, feeds CRD its indices, contrast indices (negatives
# drawn from other classes, as RepDistiller does) and memory banks, shows every loss term as it goes,
# and exports the trained student with `export_model_for_inferencing` to `<joint>.student.onnx`.
# Data: an .npz file with `x` (N, C, H, W) float32 images and `y` (N,) int64 labels, or, without
# --data, a seeded synthetic set of the graph's input shape (a smoke run, not a real training).
#
# As a library (the Python tests use it):
#     sidecar = read_sidecar("out/joint.onnx")          # or "out/joint.json"
#     stage = Stage(sidecar, "out/artifacts")          # generate_artifacts + Module + AdamW
#     out = stage.step({"input": x, "labels": y})      # {output name: value}, after one update
#     out = stage.forward_backward(values)             # gradients only: stage.gradient(name)
#     logits = stage.evaluate(values)["logits"]        # eval mode (BN running statistics)
#     stage.export("out/student.onnx")                 # the trained student alone
#
# Versions: onnx >= 1.17 stamps its own IR version on the generated optimizer model, which
# ORT Training 1.19 refuses; generate() sets it back to 10.
#
# A graph and a sidecar of two different merges (an interrupted merge, a file copied over) are
# refused: read_sidecar checks the sidecar's model_hash against the graph file, as `kdgraph check`
# does, and raises SidecarMismatch; the command line prints it on one line and exits with 1.
#
# ORT logs at INFO level while it builds the gradient graph and opens sessions (dozens of lines per
# stage); generate() and Stage set its severity to ORT_LOG_SEVERITY (errors only) first: the default
# logger's, the sessions', and the session options that generate_artifacts makes for its gradient
# graph builder (it takes none from the caller; quiet_gradient_builder supplies them). When ORT
# itself fails (an op without a gradient builder, a kernel that rejects a shape), train() raises
# OrtTrainingFailed with the graph file and ort_error_line's one line instead of ORT's C++ source
# location and signature; the command line prints `error: ORT Training failed on <file>: <reason>`
# and exits with 1.

import argparse
import contextlib
import functools
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

try:  # where generate_artifacts makes the session options of its gradient graph builder (ORT 1.19)
    from onnxruntime.training.onnxblock import _training_graph_utils
except ImportError:  # another layout: generate_artifacts then logs as it likes
    _training_graph_utils = None

ORT_TRAINING_MAX_IR = 10
STATE_SUFFIX = "_next"  # a state input `x` is updated by the output `x_next`
DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}
print_now = functools.partial(print, flush=True)
# ORT's log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. The command line raises it
# to 4: it prints every failure itself (ORT also logs a failing kernel at error level).
ORT_LOG_SEVERITY = 3


# --------------------------------------------------------------------------- sidecar


class SidecarMismatch(ValueError):
    """A sidecar whose model_hash is not the hash of the graph file beside it."""


_HASH_K1 = np.uint64(0x9E3779B97F4A7C15)
_HASH_K2 = np.uint64(0xC2B2AE3D27D4EB4F)


def content_hash(data):
    """kdgraph's fingerprint of a file's bytes (src/onnx/io.rs `content_hash`), `<hex>-<length>`:
    the xor over its 8-byte little-endian words (the last one zero-padded) of
    `word * K1 ^ index * K2`, in wrapping 64-bit arithmetic."""
    data = bytes(data)
    words = np.frombuffer(data + b"\0" * (-len(data) % 8), dtype="<u8").astype(np.uint64)
    index = np.arange(len(words), dtype=np.uint64)
    mixed = (words * _HASH_K1) ^ (index * _HASH_K2)  # uint64 arrays wrap, as Rust's wrapping_mul
    value = int(np.bitwise_xor.reduce(mixed)) if len(mixed) else 0
    return f"{value:016x}-{len(data)}"


def read_sidecar(path):
    """The sidecar of a joint graph (the .onnx or its .json), with `model_path` added.

    Raises SidecarMismatch when the sidecar records a model_hash that the graph file does not have
    (the graph and the sidecar come from different merges)."""
    path = Path(path)
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    sidecar = json.loads(json_path.read_text())
    model_path = json_path.parent / sidecar["model"]
    sidecar["model_path"] = str(model_path)
    recorded = sidecar.get("model_hash")
    if recorded:
        actual = content_hash(model_path.read_bytes())
        if actual != recorded:
            raise SidecarMismatch(
                f"`{model_path}` and `{json_path}` come from different merges (the sidecar records model_hash "
                f"{recorded}, the graph hashes to {actual}); run kdgraph merge again"
            )
    return sidecar


def outputs_with_role(sidecar, *roles):
    """Names of the graph outputs whose role is one of `roles`, in graph order."""
    return [o["name"] for o in sidecar["outputs"] if o["role"] in roles]


def loss_outputs(sidecar):
    """The total loss and every term."""
    return outputs_with_role(sidecar, "loss", "term")


def student_outputs(sidecar):
    """The student's own outputs (the logits)."""
    return outputs_with_role(sidecar, "student")


def input_with_role(sidecar, role):
    """The name of the first graph input with this role."""
    return next(i["name"] for i in sidecar["inputs"] if i["role"] == role)


# --------------------------------------------------------------------------- ORT failures


# What ORT raises: C++ exceptions arrive as RuntimeError, ORT statuses as the pybind classes.
ORT_ERRORS = (RuntimeError, ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
              ort_state.InvalidProtobuf, ort_state.NoSuchFile, ort_state.NoModel, ort_state.NotImplemented,
              ort_state.RuntimeException, ort_state.EPFail)


class OrtTrainingFailed(RuntimeError):
    """ORT Training raised while generating the artifacts of, training or exporting `model_path`."""

    def __init__(self, model_path, reason):
        super().__init__(f"ORT Training failed on {model_path}: {reason}")
        self.model_path, self.reason = str(model_path), reason


def quiet_ort(severity=None):
    """Sets ORT's default logger to `severity` (ORT_LOG_SEVERITY when None)."""
    onnxruntime.set_default_logger_severity(ORT_LOG_SEVERITY if severity is None else severity)


# An ORT status: `[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : <message>`.
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")
# ORT_ENFORCE / ORT_THROW: `<source file>:<line> <C++ signature> <condition> was false. <message>`.
_ORT_SOURCE = re.compile(r"^\S+\.(?:cc|h|cpp|hpp|cu|cuh):\d+ ")


def _strip_signature(text):
    """(the function's short name, what follows) for `<return type> <qualified name>(<args>) [const] <rest>`."""
    open_at = text.find("(")
    if open_at < 0:
        return "", text
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            break
    else:
        return "", text
    rest = text[i + 1:]
    if rest.startswith(" const"):
        rest = rest[len(" const"):]
    name = text[:open_at].split(" ")[-1]
    for prefix in ("onnxruntime::training::api::", "onnxruntime::training::", "onnxruntime::"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name, rest.strip()


def ort_error_line(exc):
    """The first meaningful line of an ORT exception: its message without ORT's source location and
    C++ signature, e.g. `The gradient builder has not been registered: HardSwish for node /act/HardSwish`
    or `Non-zero status code returned while running Expand node. Name:'/ReduceMean_Grad/Expand_5' Status
    Message: invalid expand shape`; an enforce without a message gives its function and condition
    (`GradientBuilderBase::O: i < node_->OutputDefs().size() was false`)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    status = _ORT_STATUS.search(line)
    if status:
        return line[status.end():].strip() or line
    source = _ORT_SOURCE.match(line)
    if not source:
        return line
    function, rest = _strip_signature(line[source.end():])
    condition, enforced, message = rest.partition(" was false.")
    if enforced:
        message = message.strip()
        if message:
            return message
        rest = condition + " was false"
    return f"{function}: {rest}" if function else rest


def session_options():
    """Session options that log at ORT_LOG_SEVERITY."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    return options


@contextlib.contextmanager
def quiet_gradient_builder():
    """generate_artifacts builds the gradient graph with `SessionOptions()` of its own, which log at
    INFO level whatever the default logger's severity; inside, they are session_options()."""
    made = getattr(_training_graph_utils, "SessionOptions", None)
    if made is None:  # another ORT layout: nothing to quiet
        yield
        return
    _training_graph_utils.SessionOptions = session_options
    try:
        yield
    finally:
        _training_graph_utils.SessionOptions = made


@contextlib.contextmanager
def ort_failures(model_path):
    """Turns an ORT exception raised inside into OrtTrainingFailed(model_path, its first meaningful line)."""
    try:
        yield
    except ORT_ERRORS as exc:
        if isinstance(exc, OrtTrainingFailed):
            raise
        raise OrtTrainingFailed(model_path, ort_error_line(exc)) from exc


# --------------------------------------------------------------------------- artifacts


def carry_parameters(model, values):
    """Replaces the model's initializers that share a name with `values` (init stage -> main)."""
    for tensor in model.graph.initializer:
        if tensor.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(values[tensor.name], dtype), tensor.name))


def generate(sidecar, workdir, model=None, optimizer=None):
    """generate_artifacts from the sidecar's parameter lists; the models return every graph output.

    The loss is the graph's output 0 (loss=None); the training and eval models also return the
    terms, the student's outputs and the state outputs. `model` replaces the sidecar's graph;
    `optimizer` (an onnxblock optimizer block) ORT's default AdamW (eps 1e-6, no weight decay).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quiet_ort()
    with quiet_gradient_builder():
        artifacts.generate_artifacts(
            model if model is not None else onnx.load(sidecar["model_path"]),
            requires_grad=list(sidecar["requires_grad"]),
            frozen_params=list(sidecar["frozen_params"]),
            loss=None,
            optimizer=optimizer or artifacts.OptimType.AdamW,
            artifact_directory=str(workdir),
            loss_input_names=[o["name"] for o in sidecar["outputs"]],
        )
    optimizer_path = workdir / "optimizer_model.onnx"
    optimizer_model = onnx.load(str(optimizer_path))
    if optimizer_model.ir_version > ORT_TRAINING_MAX_IR:
        optimizer_model.ir_version = ORT_TRAINING_MAX_IR
        onnx.save(optimizer_model, str(optimizer_path))
    return workdir


# --------------------------------------------------------------------------- one stage


class Stage:
    """One stage graph: its sidecar, its artifacts, and the ORT Training module and AdamW over them."""

    def __init__(self, sidecar, workdir, device="cpu", lr=1e-3, carried=None, generated=False):
        """sidecar: a path (.onnx or .json) or read_sidecar's dict; carried: {name: array} written
        over the graph's initializers first; generated: reuse the artifacts already in workdir."""
        self.sidecar = sidecar if isinstance(sidecar, dict) else read_sidecar(sidecar)
        self.workdir = Path(workdir)
        if not generated:
            model = None
            if carried:
                model = onnx.load(self.sidecar["model_path"])
                carry_parameters(model, carried)
            generate(self.sidecar, self.workdir, model)
        quiet_ort()
        self.state = CheckpointState.load_checkpoint(str(self.workdir / "checkpoint"))
        self.module = Module(str(self.workdir / "training_model.onnx"), self.state,
                             str(self.workdir / "eval_model.onnx"), device=device, session_options=session_options())
        self.optimizer = Optimizer(str(self.workdir / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(lr)
        self.roles = {i["name"]: i for i in self.sidecar["inputs"]}

    def feeds(self, values):
        """The module's inputs in its order, from a dict by name, cast to the sidecar's dtypes."""
        missing = [n for n in self.module.input_names() if n not in values]
        if missing:
            raise KeyError(f"no value for the graph inputs {missing} (have {sorted(values)})")
        dtypes = {n: DTYPES[spec["dtype"]] for n, spec in self.roles.items()}
        return [np.ascontiguousarray(values[n], dtypes.get(n)) for n in self.module.input_names()]

    def _run(self, values):
        outputs = self.module(*self.feeds(values))
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return dict(zip(self.module.output_names(), outputs))

    def forward_backward(self, values):
        """A training-mode forward and backward pass without update; the outputs by name."""
        self.module.train()
        self.module.lazy_reset_grad()
        return self._run(values)

    def step(self, values):
        """One training step (forward, backward, AdamW); the outputs of its forward pass by name."""
        outputs = self.forward_backward(values)
        self.optimizer.step()
        return outputs

    def evaluate(self, values):
        """An eval-mode forward pass (BN running statistics); the outputs by name."""
        self.module.eval()
        try:
            return self._run(values)
        finally:
            self.module.train()

    def parameters(self, trainable_only=False):
        """The checkpoint's parameters by name, as numpy arrays."""
        return {name: np.array(p.data) for name, p in self.state.parameters if p.requires_grad or not trainable_only}

    def parameter(self, name):
        """One parameter's current value."""
        return np.array(self.state.parameters[name].data)

    def gradient(self, name):
        """The gradient of `name` from the last backward pass (None when it holds none)."""
        grad = self.state.parameters[name].grad
        return None if grad is None else np.array(grad)

    def save_checkpoint(self, path):
        """Saves the parameters and returns the checkpoint read back."""
        CheckpointState.save_checkpoint(self.state, str(path))
        return CheckpointState.load_checkpoint(str(path))

    def export(self, path, outputs=None):
        """Writes the trained student alone (default outputs: the student's) to `path`."""
        self.module.export_model_for_inferencing(str(path), list(outputs or student_outputs(self.sidecar)))
        return Path(path)


# --------------------------------------------------------------------------- data


class Data:
    """Images and labels, with RepDistiller's contrast sampling for CRD."""

    def __init__(self, x, y, seed=0):
        self.x, self.y = x.astype(np.float32), y.astype(np.int64)
        self.rng = np.random.default_rng(seed)
        self.by_class = {c: np.flatnonzero(self.y != c) for c in np.unique(self.y)}

    @classmethod
    def synthetic(cls, shape, classes, count, seed=0):
        """`count` standard-normal images of `shape` with uniform labels."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((count, *shape)).astype(np.float32)
        return cls(x, rng.integers(0, classes, count), seed)

    def batch(self, size):
        """(dataset indices, images, labels) of a random batch."""
        index = self.rng.choice(len(self.y), size, replace=False)
        return index, self.x[index], self.y[index]

    def contrast(self, index, negatives):
        """Column 0 the sample itself, then `negatives` samples of other classes, without replacement."""
        rows = []
        for i in index:
            pool = self.by_class[self.y[i]]
            rows.append(np.concatenate([[i], self.rng.choice(pool, negatives, replace=len(pool) < negatives)]))
        return np.stack(rows).astype(np.int64)


def crd_state(hyper, seed=0):
    """Memory banks initialised as RepDistiller does (uniform in +-1/sqrt(dim/3)); Z not yet estimated."""
    n, dim = hyper["n_data"], hyper["feat_dim"]
    bound = 1.0 / np.sqrt(dim / 3)
    rng = np.random.default_rng(seed)
    return {
        "kd/crd/memory_student": rng.uniform(-bound, bound, (n, dim)).astype(np.float32),
        "kd/crd/memory_teacher": rng.uniform(-bound, bound, (n, dim)).astype(np.float32),
        "kd/crd/z": np.array([-1.0, -1.0], np.float32),
    }


# --------------------------------------------------------------------------- training


@dataclass
class Record:
    """One training step: the dataset indices of its batch and the outputs of its forward pass."""

    index: np.ndarray
    outputs: dict


@dataclass
class Result:
    """What `train` did: the exported student, each stage's steps and each stage's Stage."""

    student: Path
    histories: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)


def train_stage(stage, data, steps, batch, log=print_now):
    """Runs `steps` steps, feeding state outputs back as the next inputs; a Record per step."""
    hyper = stage.sidecar["hyper"]
    state = crd_state(hyper["crd"]) if "kd/crd/index" in stage.roles else {}
    if state and len(data.y) != hyper["crd"]["n_data"]:
        raise ValueError(f"CRD's memories hold {hyper['crd']['n_data']} samples (--crd-n-data), the data has {len(data.y)}")
    image = input_with_role(stage.sidecar, "image")
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index, x, y = data.batch(batch)
        values = {image: x, "labels": y, **state}
        if state:
            values["kd/crd/index"] = index.astype(np.int64)
            values["kd/crd/contrast_index"] = data.contrast(index, hyper["crd"]["negatives"])
        try:
            out = stage.step(values)
        except BaseException:
            if history:
                log("")  # ends the progress line before the error is shown
            raise
        for name in state:
            state[name] = out[name + STATE_SUFFIX]
        history.append(Record(index, out))
        terms = "  ".join(f"{k} {float(v):.4g}" for k, v in out.items() if np.ndim(v) == 0)
        rate = step / (time.perf_counter() - start)
        bar = "#" * (20 * step // steps)
        log(f"\r{stage.sidecar['stage']} [{bar:<20}] {step}/{steps}  {terms}  ({rate:.2f} steps/s)", end="")
    log("")
    return history


def train(sidecar_path, steps=100, init_steps=None, batch=32, device="cpu", lr=1e-3, data=None, workdir=None, log=print_now):
    """Trains every stage of a merged graph in order, carrying parameters by name; returns a Result.

    Raises SidecarMismatch before anything trains when a graph and its sidecar disagree, and
    OrtTrainingFailed (naming the stage's graph file) when ORT fails on a stage."""
    sidecar_path = Path(sidecar_path)
    main = read_sidecar(sidecar_path)
    # Every stage's graph and sidecar are checked before any stage trains.
    sidecars = {spec["name"]: read_sidecar(sidecar_path.parent / spec["sidecar"]) for spec in main["stages"]}
    workdir = Path(workdir or tempfile.mkdtemp(prefix="kdgraph-train-"))
    if data is None:
        image = next(i for i in main["inputs"] if i["role"] == "image")
        logits = next(o for o in main["outputs"] if o["role"] == "student")
        count = main["hyper"].get("crd", {}).get("n_data", max(4 * batch, 256))
        data = Data.synthetic(image["shape"][1:], logits["shape"][-1], count)
    result, carried, stage = Result(sidecar_path.with_suffix(".student.onnx")), None, None
    for spec in main["stages"]:
        with ort_failures(sidecars[spec["name"]]["model_path"]):
            stage = Stage(sidecars[spec["name"]], workdir / spec["name"], device, lr,
                          carried if spec.get("carry_from") else None)
            stage_steps = (init_steps or steps) if spec["name"] == "init" else steps
            result.histories[spec["name"]] = train_stage(stage, data, stage_steps, batch, log)
        result.stages[spec["name"]] = stage
        carried = stage.parameters()
    with ort_failures(main["model_path"]):
        stage.export(result.student, student_outputs(main))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sidecar", help="the .json written beside the joint graph by kdgraph merge")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the main stage")
    parser.add_argument("--init-steps", type=int, help="training steps of the init stage (default: --steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", help=".npz with x (N, C, H, W) float32 and y (N,) int64; default: synthetic")
    parser.add_argument("--workdir", help="where the ORT artifacts go (default: a temporary folder)")
    args = parser.parse_args()
    data = None
    if args.data:
        arrays = np.load(args.data)
        data = Data(arrays["x"], arrays["y"])
    global ORT_LOG_SEVERITY
    ORT_LOG_SEVERITY = 4  # a failure is printed below, once
    try:
        result = train(args.sidecar, args.steps, args.init_steps, args.batch, args.device, args.lr, data, args.workdir)
    except SidecarMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OrtTrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"trained student: {result.student}")


if __name__ == "__main__":
    sys.exit(main())
