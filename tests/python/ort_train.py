"""Trains a kdgraph joint graph with ONNX Runtime Training, driven by its sidecar alone.

A small reusable helper for the test suite (and the seed of examples/train_ort.py):

    sidecar = load_sidecar("out/joint.onnx")               # reads out/joint.json
    paths = generate(sidecar, "out/artifacts")            # generate_artifacts + the IR fix
    session = TrainingSession(paths, sidecar=sidecar)      # CheckpointState, Module, AdamW
    batch = {"input": x, "labels": y}                      # graph inputs by name
    losses = session.train_steps(batch, steps=30)          # the loss of each step's forward
    grads = session.gradients(batch)                       # {parameter: gradient}, no update
    session.export_student("out/student.onnx", student_output_names(sidecar))

Run as a script, it trains a joint graph on a random batch: `python ort_train.py out/joint.onnx`.

Versions (RUNTIMES.md): onnxruntime-training 1.19.2 refuses the IR version that onnx >= 1.17
stamps on the generated optimizer model, so `generate` sets it back to 10 and saves it again.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime

onnxruntime.set_default_logger_severity(3)  # generate_artifacts and the sessions log at INFO

# ORT Training 1.19 accepts IR versions up to 10 (RUNTIMES.md).
ORT_TRAINING_MAX_IR = 10

_NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


def sidecar_path(joint: os.PathLike) -> Path:
    """The sidecar of a joint graph: the same path with the extension .json."""
    return Path(joint).with_suffix(".json")


def load_sidecar(joint: os.PathLike) -> dict:
    """The parsed sidecar of `joint`, with the key `model_path` (the joint graph's path) added."""
    joint = Path(joint)
    data = json.loads(sidecar_path(joint).read_text())
    data["model_path"] = str(joint)
    return data


def outputs_with_role(sidecar: dict, *roles: str) -> List[str]:
    """Names of the graph outputs whose sidecar role is one of `roles`, in graph order."""
    return [o["name"] for o in sidecar["outputs"] if o["role"] in roles]


def loss_output_names(sidecar: dict) -> List[str]:
    """The outputs the training model returns: the total loss, then every term."""
    return outputs_with_role(sidecar, "loss", "term")


def student_output_names(sidecar: dict) -> List[str]:
    return outputs_with_role(sidecar, "student")


@dataclass(frozen=True)
class ArtifactPaths:
    directory: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path


def generate(
    sidecar: dict,
    directory: os.PathLike,
    model: Optional[onnx.ModelProto] = None,
    include_student_outputs: bool = False,
) -> ArtifactPaths:
    """Runs generate_artifacts with the sidecar's requires_grad / frozen_params and AdamW.

    loss=None (the graph's output 0 is the loss), loss_input_names = the loss and term outputs
    (plus the student's outputs, e.g. the logits, with include_student_outputs: then the
    training and eval models return them too). `model` overrides the graph read from the
    sidecar's model_path. Afterwards the optimizer model's ir_version is set to 10 (ORT
    Training 1.19 refuses newer ones).
    """
    from onnxruntime.training import artifacts

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = onnx.load(sidecar["model_path"])
    artifacts.generate_artifacts(
        model,
        requires_grad=list(sidecar["requires_grad"]),
        frozen_params=list(sidecar["frozen_params"]),
        loss=None,
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(directory),
        loss_input_names=loss_output_names(sidecar) + (student_output_names(sidecar) if include_student_outputs else []),
    )
    paths = ArtifactPaths(
        directory=directory,
        training_model=directory / "training_model.onnx",
        eval_model=directory / "eval_model.onnx",
        optimizer_model=directory / "optimizer_model.onnx",
        checkpoint=directory / "checkpoint",
    )
    optimizer = onnx.load(str(paths.optimizer_model))
    if optimizer.ir_version > ORT_TRAINING_MAX_IR:
        optimizer.ir_version = ORT_TRAINING_MAX_IR
        onnx.save(optimizer, str(paths.optimizer_model))
    return paths


class TrainingSession:
    """CheckpointState + Module + AdamW optimizer over generated artifacts, on CPU."""

    def __init__(self, paths: ArtifactPaths, lr: float = 1e-3, device: str = "cpu", sidecar: Optional[dict] = None):
        """sidecar: when given, its inputs' dtypes are used to cast the fed arrays."""
        from onnxruntime.training import api

        self.paths = paths
        self.dtypes = {i["name"]: i["dtype"] for i in sidecar["inputs"]} if sidecar else {}
        self.state = api.CheckpointState.load_checkpoint(str(paths.checkpoint))
        self.module = api.Module(str(paths.training_model), self.state, str(paths.eval_model), device=device)
        self.optimizer = api.Optimizer(str(paths.optimizer_model), self.module)
        self.optimizer.set_learning_rate(lr)

    # -- inputs

    def feeds(self, named: Dict[str, np.ndarray], dtypes: Optional[Dict[str, str]] = None) -> List[np.ndarray]:
        """The user inputs in module.input_names() order, as contiguous arrays of exact dtype.

        named: {input name: array}; dtypes: {input name: numpy dtype name} (e.g. from the sidecar's
        inputs); without it float inputs become float32 and integer ones int64.
        """
        out = []
        for name in self.module.input_names():
            if name not in named:
                raise KeyError(f"no value for the graph input {name!r} (have {sorted(named)})")
            value = np.asarray(named[name])
            if dtypes and name in dtypes:
                value = value.astype(_NUMPY_DTYPES[dtypes[name]], copy=False)
            elif np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32, copy=False)
            else:
                value = value.astype(np.int64, copy=False)
            out.append(np.ascontiguousarray(value))
        return out

    def _call(self, named: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outputs = self.module(*self.feeds(named, self.dtypes))
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return dict(zip(self.module.output_names(), outputs))

    # -- steps

    def forward_backward(self, named: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One training-mode forward and backward pass (gradients reset first), no update."""
        self.module.train()
        self.module.lazy_reset_grad()
        return self._call(named)

    def step(self, named: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One training step: forward, backward, AdamW update; returns the outputs of the forward."""
        outputs = self.forward_backward(named)
        self.optimizer.step()
        return outputs

    def train_steps(self, named: Dict[str, np.ndarray], steps: int, loss_name: str = "loss") -> List[float]:
        """`steps` training steps on the same batch; the loss of each step's forward pass."""
        return [float(self.step(named)[loss_name]) for _ in range(steps)]

    def evaluate(self, named: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One eval-mode forward pass (BN running statistics) with the eval model's outputs."""
        self.module.eval()
        try:
            return self._call(named)
        finally:
            self.module.train()

    # -- parameters and gradients

    def parameter_names(self, trainable_only: bool = False) -> List[str]:
        """Names of the checkpoint's parameters (iterating Parameters yields (name, Parameter))."""
        return [name for name, param in self.state.parameters if param.requires_grad or not trainable_only]

    def parameter(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data)

    def gradient(self, name: str) -> Optional[np.ndarray]:
        """The gradient of the last backward pass for `name` (None when none is held)."""
        grad = self.state.parameters[name].grad
        return None if grad is None else np.array(grad)

    def gradients(self, named: Dict[str, np.ndarray], names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """One forward/backward without update; {parameter: gradient} for `names` (default: trainable)."""
        self.forward_backward(named)
        if names is None:
            names = self.parameter_names(trainable_only=True)
        return {name: self.gradient(name) for name in names}

    def save_checkpoint(self, path: os.PathLike):
        """Saves the current state (parameters, no optimizer state) and returns it read back."""
        from onnxruntime.training import api

        api.CheckpointState.save_checkpoint(self.state, str(path))
        return api.CheckpointState.load_checkpoint(str(path))

    def export_student(self, path: os.PathLike, output_names: Sequence[str]) -> Path:
        """The trained student alone (inference model with only `output_names`)."""
        self.module.export_model_for_inferencing(str(path), list(output_names))
        return Path(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("joint", type=Path, help="the joint graph written by `kdgraph merge` (its .json beside it)")
    parser.add_argument("--out", type=Path, default=None, help="artifact folder (default: beside the graph)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    sidecar = load_sidecar(args.joint)
    out = args.out or args.joint.parent / "artifacts"
    session = TrainingSession(generate(sidecar, out), lr=args.lr, sidecar=sidecar)
    student = [o for o in sidecar["outputs"] if o["role"] == "student"]
    classes = int(student[0]["shape"][-1]) if student and "shape" in student[0] else 10
    rng = np.random.RandomState(0)
    named = {}
    for spec in sidecar["inputs"]:
        shape = [args.batch if isinstance(d, str) else d for d in spec["shape"]]
        if spec["role"] == "labels":
            named[spec["name"]] = rng.randint(0, classes, size=shape).astype(np.int64)
        else:
            named[spec["name"]] = rng.standard_normal(shape).astype(_NUMPY_DTYPES[spec["dtype"]])
    for i, loss in enumerate(session.train_steps(named, args.steps)):
        print(f"step {i:3d}  loss {loss:.6f}")
    student = session.export_student(out / "student.onnx", student_output_names(sidecar))
    print(f"wrote {student}")


if __name__ == "__main__":
    main()
