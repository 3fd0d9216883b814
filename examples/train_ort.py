"""Train a graph written by `kdgraph merge` with ONNX Runtime Training, stage by stage.

    python examples/train_ort.py joint.json [--steps 200] [--batch 64] [--device cuda] [--data data.npz]

Reads the sidecar, trains the init stage first where there is one (AB, FSP, FT) and carries its
trained parameters into the main stage by name, feeds CRD its indices, contrast indices (negatives
drawn from other classes, as RepDistiller does) and memory banks, shows every loss term as it
goes, and exports the trained student with `export_model_for_inferencing` to `<joint>.student.onnx`.
Data: an .npz file with `x` (N, C, H, W) float32 images and `y` (N,) int64 labels, or, without
--data, a seeded synthetic set of the graph's input shape (a smoke run, not a real training).
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.training import artifacts
from onnxruntime.training.api import CheckpointState, Module, Optimizer

STATE_SUFFIX = "_next"
print_now = functools.partial(print, flush=True)


class Stage:
    """One stage graph: its sidecar, artifacts, and the ORT Training module over them."""

    def __init__(self, sidecar_path, workdir, device="cpu", lr=1e-3, carried=None):
        self.path = Path(sidecar_path)
        self.sidecar = json.loads(self.path.read_text())
        model = onnx.load(str(self.path.parent / self.sidecar["model"]))
        if carried:
            carry_parameters(model, carried)
        self.fetches = [o["name"] for o in self.sidecar["outputs"] if o["role"] in ("loss", "term", "state")]
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        artifacts.generate_artifacts(
            model,
            requires_grad=self.sidecar["requires_grad"],
            frozen_params=self.sidecar["frozen_params"],
            loss=None,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(workdir),
            loss_input_names=self.fetches,
        )
        # onnx >= 1.17 stamps its own IR version on the optimizer graph; ORT Training 1.19 reads <= 10.
        optimizer_path = workdir / "optimizer_model.onnx"
        optimizer_model = onnx.load(str(optimizer_path))
        optimizer_model.ir_version = min(optimizer_model.ir_version, 10)
        onnx.save(optimizer_model, str(optimizer_path))
        self.state = CheckpointState.load_checkpoint(str(workdir / "checkpoint"))
        self.module = Module(str(workdir / "training_model.onnx"), self.state, str(workdir / "eval_model.onnx"), device=device)
        self.optimizer = Optimizer(str(optimizer_path), self.module)
        self.optimizer.set_learning_rate(lr)
        self.roles = {i["name"]: i for i in self.sidecar["inputs"]}

    def feeds(self, values):
        """Inputs in the module's order, from a dict by name."""
        return [values[name] for name in self.module.input_names()]

    def step(self, values):
        """One training step; returns the fetched outputs by name."""
        self.module.train()
        out = self.module(*self.feeds(values))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return dict(zip(self.fetches, out))

    def parameters(self):
        """Every parameter of the checkpoint by name, as numpy arrays."""
        return {name: np.array(p.data) for name, p in self.state.parameters}


def carry_parameters(model, values):
    """Replaces the model's initializers that share a name with `values` (init stage -> main)."""
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in values:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[tensor.name].astype(np.float32), tensor.name))


class Data:
    """Images and labels, with RepDistiller's contrast sampling for CRD."""

    def __init__(self, x, y, seed=0):
        self.x, self.y = x.astype(np.float32), y.astype(np.int64)
        self.rng = np.random.default_rng(seed)
        self.by_class = {c: np.flatnonzero(self.y != c) for c in np.unique(self.y)}

    @classmethod
    def synthetic(cls, shape, classes, count, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((count, *shape)).astype(np.float32)
        return cls(x, rng.integers(0, classes, count), seed)

    def batch(self, size):
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


def train_stage(stage, data, steps, batch, log=print_now):
    """Runs `steps` steps; returns the list of fetched outputs per step."""
    hyper = stage.sidecar["hyper"]
    state = crd_state(hyper["crd"]) if "kd/crd/index" in stage.roles else {}
    image = next(i["name"] for i in stage.sidecar["inputs"] if i["role"] == "image")
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index, x, y = data.batch(batch)
        values = {image: x, "labels": y, **state}
        if state:
            values["kd/crd/index"] = index.astype(np.int64)
            values["kd/crd/contrast_index"] = data.contrast(index, hyper["crd"]["negatives"])
        out = stage.step(values)
        for name in state:
            state[name] = out[name + STATE_SUFFIX]
        history.append(out)
        terms = "  ".join(f"{k} {float(v):.4g}" for k, v in out.items() if np.ndim(v) == 0)
        rate = step / (time.perf_counter() - start)
        bar = "#" * (20 * step // steps)
        log(f"\r{stage.sidecar['stage']} [{bar:<20}] {step}/{steps}  {terms}  ({rate:.2f} steps/s)", end="")
    log("")
    return history


def train(sidecar_path, steps=100, init_steps=None, batch=32, device="cpu", lr=1e-3, data=None, workdir=None, log=print_now):
    """Trains every stage of a merged graph; returns (trained student path, histories by stage)."""
    sidecar_path = Path(sidecar_path)
    main = json.loads(sidecar_path.read_text())
    workdir = Path(workdir or tempfile.mkdtemp(prefix="kdgraph-train-"))
    if data is None:
        image = next(i for i in main["inputs"] if i["role"] == "image")
        logits = next(o for o in main["outputs"] if o["role"] == "student")
        count = main["hyper"].get("crd", {}).get("n_data", max(4 * batch, 256))
        data = Data.synthetic(image["shape"][1:], logits["shape"][-1], count)
    carried, histories, stage = None, {}, None
    for spec in main["stages"]:
        stage = Stage(sidecar_path.parent / spec["sidecar"], workdir / spec["name"], device, lr, carried)
        histories[spec["name"]] = train_stage(stage, data, init_steps or steps if spec["name"] == "init" else steps, batch, log)
        carried = stage.parameters()
    student = sidecar_path.with_suffix(".student.onnx")
    outputs = [o["name"] for o in main["outputs"] if o["role"] == "student"]
    stage.module.export_model_for_inferencing(str(student), outputs)
    return student, histories


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    student, _ = train(args.sidecar, args.steps, args.init_steps, args.batch, args.device, args.lr, data, args.workdir)
    print(f"trained student: {student}")


if __name__ == "__main__":
    sys.exit(main())
