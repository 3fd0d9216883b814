"""Conv backward on stock onnxruntime: for resnet18 and MobileNetV2 layer shapes (batch 32, 64x64
input), forward-only against forward+backward of kdgraph's gradient graph, and PyTorch's same ratio.

Run it in an environment with stock onnxruntime, onnx and numpy (PyTorch is timed by
conv_backward_torch.py in the Python given by --torch-python, through a subprocess):

    python bench/conv_backward.py --kdgraph target/debug/kdgraph --torch-python .venv/bin/python

For each layer it builds a one-Conv model, x = x_in + shift; y = Conv(x, W, B);
loss = sum(y * r), with x_in and r graph inputs (so onnxruntime cannot fold dY or im2col(X) into
constants), differentiates it with `kdgraph grad --wrt shift --wrt W --wrt B` (dX, dW, dB), and
times the plain Conv (forward) against the whole gradient graph (forward+backward, including the
Add, Mul and ReduceSum around the Conv and their gradients: a slightly pessimistic ratio). The
two sessions run interleaved, several repetitions (timing.py); thread pools do not spin, and the
ratio is given by wall clock and by CPU time: on a machine shared with other jobs the CPU-time
ratio is the figure to read."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from timing import time_pair

ROOT = Path(__file__).resolve().parents[1]

# name: (in channels, height, width, out channels, kernel, stride, pad, group), at 64x64 input.
LAYERS = {
    "resnet18 conv1 7x7 s2": (3, 64, 64, 64, 7, 2, 3, 1),
    "resnet18 layer1 3x3 s1": (64, 16, 16, 64, 3, 1, 1, 1),
    "resnet18 layer2 3x3 s2": (64, 16, 16, 128, 3, 2, 1, 1),
    "resnet18 layer2 downsample 1x1 s2": (64, 16, 16, 128, 1, 2, 0, 1),
    "resnet18 layer2 3x3 s1": (128, 8, 8, 128, 3, 1, 1, 1),
    "resnet18 layer3 3x3 s1": (256, 4, 4, 256, 3, 1, 1, 1),
    "resnet18 layer4 3x3 s1": (512, 2, 2, 512, 3, 1, 1, 1),
    "mobilenetv2 stem 3x3 s2": (3, 64, 64, 32, 3, 2, 1, 1),
    "mobilenetv2 expand 1x1": (24, 16, 16, 144, 1, 1, 0, 1),
    "mobilenetv2 project 1x1": (144, 16, 16, 24, 1, 1, 0, 1),
    "mobilenetv2 depthwise 3x3 s1": (144, 16, 16, 144, 3, 1, 1, 144),
    "mobilenetv2 depthwise 3x3 s2": (96, 32, 32, 96, 3, 2, 1, 96),
    "mobilenetv2 depthwise 3x3 s1 4x4": (384, 4, 4, 384, 3, 1, 1, 384),
}


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv_node(layer, x: str, y: str) -> onnx.NodeProto:
    _, _, _, _, k, s, p, g = layer
    return helper.make_node("Conv", [x, "w", "b"], [y], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g)


def models(layer, batch: int, rng: np.random.Generator):
    """(the forward model: one Conv; the source model kdgraph differentiates)."""
    c, h, w, m, k, s, p, g = layer
    ho, wo = output_size(h, k, s, p), output_size(w, k, s, p)
    weight = numpy_helper.from_array((rng.standard_normal((m, c // g, k, k)) * 0.1).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b")
    x_info = helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [batch, c, h, w])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, m, ho, wo])
    r_info = helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, m, ho, wo])
    forward = helper.make_graph([conv_node(layer, "x_in", "y")], "forward", [x_info], [y_info], [weight, bias])
    shift = numpy_helper.from_array(np.zeros((1, c, 1, 1), np.float32), "shift")
    nodes = [
        helper.make_node("Add", ["x_in", "shift"], ["x"]),
        conv_node(layer, "x", "y"),
        helper.make_node("Mul", ["y", "r"], ["yr"]),
        helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0),
    ]
    loss_info = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    source = helper.make_graph(nodes, "source", [x_info, r_info], [loss_info], [weight, bias, shift])
    return [finish(graph) for graph in (forward, source)]


def finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def differentiate(kdgraph: Path, source: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    onnx.save(source, tmp / "source.onnx")
    out = tmp / "grad.onnx"
    args = [str(kdgraph), "grad", str(tmp / "source.onnx"), "--loss", "loss", "-o", str(out)]
    for name in ("shift", "w", "b"):
        args += ["--wrt", name]
    subprocess.run(args, check=True, capture_output=True, text=True)
    return onnx.load(out)


def weight_grad_form(grad: onnx.ModelProto) -> str:
    """Which weight-gradient formulation kdgraph wrote, read off the backward nodes."""
    ops = [n.op_type for n in grad.graph.node if n.name.startswith("grad/y/dw")]
    if "Conv" in ops:
        return "batch-transposed Conv"
    if "Gather" in ops:
        return "im2col Gather + " + ("Gemm" if "Gemm" in ops else "MatMul")
    if "MatMul" in ops:
        return "1x1: MatMul per sample + ReduceSum"
    return "1x1: one Gemm"


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_ort(layer, batch, kdgraph, threads, repeats, iterations, rng, tmp):
    forward_model, source = models(layer, batch, rng)
    grad = differentiate(kdgraph, source, tmp)
    c, h, w, m, k, s, p, _ = layer
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    r = rng.standard_normal((batch, m, output_size(h, k, s, p), output_size(w, k, s, p))).astype(np.float32)
    fwd, both = session(forward_model, threads), session(grad, threads)
    result = time_pair(lambda: fwd.run(None, {"x_in": x}), lambda: both.run(None, {"x_in": x, "r": r}), repeats, iterations)
    result["weight_grad"] = weight_grad_form(grad)
    return result


def time_torch(python: str, layers: dict, batch, threads, repeats, iterations) -> dict:
    script = Path(__file__).with_name("conv_backward_torch.py")
    spec = json.dumps({"layers": layers, "batch": batch, "threads": threads, "repeats": repeats, "iterations": iterations})
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run([python, str(script), spec], check=True, capture_output=True, text=True, env=env)
    return json.loads(run.stdout)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def kdgraph_commit() -> str:
    run = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_bin = os.environ.get("KDGRAPH_BIN", str(ROOT / "target" / "debug" / "kdgraph"))
    parser.add_argument("--kdgraph", type=Path, default=Path(default_bin))
    parser.add_argument("--torch-python", default=str(ROOT / ".venv" / "bin" / "python"), help="'' to skip PyTorch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--only", default="", help="time only the layers whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "conv_backward.json")
    args = parser.parse_args()
    layers = {name: layer for name, layer in LAYERS.items() if args.only in name}
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__, "kdgraph": kdgraph_commit()},
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "layers": {},
    }
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, layer in layers.items():
            result = time_ort(layer, args.batch, args.kdgraph, args.threads, args.repeats, args.iterations, rng, Path(tmp))
            report["layers"][name] = {"shape": dict(zip("c h w m k s p group".split(), layer)), "onnxruntime": result}
            print(f"{name:36s} ort   {result['forward_ms']:8.2f} ms  x{result['ratio']:6.2f}  cpu x{result['cpu_ratio']:5.2f}  ({result['weight_grad']})", flush=True)
    if args.torch_python:
        torch_report = time_torch(args.torch_python, layers, args.batch, args.threads, args.repeats, args.iterations)
        report["versions"]["torch"] = torch_report["torch"]
        for name, result in torch_report["layers"].items():
            report["layers"][name]["torch"] = result
            print(f"{name:36s} torch {result['forward_ms']:8.2f} ms  x{result['ratio']:6.2f}  cpu x{result['cpu_ratio']:5.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
