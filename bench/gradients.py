"""Benchmark of kdgraph's own gradients (issue 11): the gradient graph of a joint graph on stock
onnxruntime, against its forward pass alone, ORT Training's forward+backward of the same joint
graph, and PyTorch eager's forward+backward of the same two modules.

Run: .venv/bin/python bench/gradients.py [--sizes 64,224] [--methods kd,at] [--batch 32]
Needs .venv (torch, ORT Training) and .venv-ort (stock onnxruntime 1.31); scripts/python-env.sh
makes both. Uses target/debug/kdgraph (or $KDGRAPH_BIN) to merge: merge time is not measured here.
Models: torchvision resnet50 (eval export, BN folded) as teacher, resnet18 (training-mode export)
as student, random weights, cached in bench/.cache. 2 intra-op threads everywhere.
Writes bench/results/gradients.json and prints a Markdown table.

The four timings are taken in rounds, one call of each per round (after a warm-up round), so that a
machine whose speed drifts slows every route alike: the ratios are the medians of the rounds'
ratios, the times the medians of the rounds' times. Stock onnxruntime runs in a worker process
(.venv-ort) that keeps its sessions and times one call per request.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
import torchvision

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))
from bench import CACHE, model_pair, save_result  # noqa: E402
from timing import Worker, rounds, seconds  # noqa: E402
import train_ort  # noqa: E402

THREADS = 2
ROUNDS = 7
KD_T = 4.0

# A worker in .venv-ort: keeps stock onnxruntime sessions of the forward pass (the joint graph) and
# the gradient graph; each line "forward" or "gradients" on stdin gets one call's seconds back.
STOCK_WORKER = r"""
import sys, time
import numpy as np, onnxruntime as ort
joint, grad, feeds_path = sys.argv[1], sys.argv[2], sys.argv[3]
feeds = dict(np.load(feeds_path))
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
def session(path):
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in s.get_inputs()}
    return s, {k: v for k, v in feeds.items() if k in wanted}
sessions = {"forward": session(joint), "gradients": session(grad)}
print(ort.__version__, flush=True)
for line in sys.stdin:
    s, f = sessions[line.strip()]
    t = time.perf_counter(); s.run(None, f)
    print(time.perf_counter() - t, flush=True)
"""


def kdgraph_bin():
    return Path(os.environ.get("KDGRAPH_BIN", ROOT / "target" / "debug" / "kdgraph"))


def pytorch_step(method, x, y, update=False):
    """One forward (teacher no-grad, student train mode) + loss + backward, as a PyTorch user runs
    it; with `update`, then torch.optim.AdamW's step (lr 1e-4) on the student."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    teacher = torchvision.models.resnet50(weights=None).eval()
    student = torchvision.models.resnet18(weights=None).train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    features = {}
    if method == "at":
        for name, module in [("t", teacher), ("s", student)]:
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                getattr(module, stage).register_forward_hook(
                    lambda m, i, o, key=f"{name}/{stage}": features.__setitem__(key, o)
                )

    def attention(f):
        a = f.pow(2).mean(1).flatten(1)
        return F.normalize(a, dim=1)

    def run():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_logits = teacher(xt)
        s_logits = student(xt)
        loss = F.cross_entropy(s_logits, yt)
        if method == "kd":
            kd = F.kl_div(F.log_softmax(s_logits / KD_T, 1), F.softmax(t_logits / KD_T, 1), reduction="batchmean")
            loss = 0.1 * loss + 0.9 * kd * KD_T * KD_T
        else:
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                loss = loss + 1000.0 * (attention(features[f"s/{stage}"]) - attention(features[f"t/{stage}"])).pow(2).mean()
        loss.backward()
        if optimizer:
            optimizer.step()

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4) if update else None
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--methods", default="kd,at")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    stock_python = ROOT / ".venv-ort" / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        teacher, student = model_pair(size)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, 3, size, size), dtype=np.float32)
        y = (np.arange(args.batch) % 1000).astype(np.int64)
        feeds = CACHE / f"feeds_{size}_{args.batch}.npz"
        np.savez(feeds, input=x, labels=y)
        for method in args.methods.split(","):
            joint = CACHE / f"{method}_{size}" / "joint.onnx"
            joint.parent.mkdir(exist_ok=True)
            subprocess.run(
                [str(kdgraph_bin()), "merge", str(teacher), str(student), "-m", method, "-o", str(joint), "--emit", "gradients", "--no-check"],
                check=True, stdout=subprocess.DEVNULL,
            )
            worker = Worker(stock_python, STOCK_WORKER, joint, joint.with_name("joint.grad.onnx"), feeds)
            stage = train_ort.Stage(joint.with_suffix(".json"), CACHE / f"{method}_{size}" / "artifacts")
            torch_run = pytorch_step(method, x, y)
            times = rounds({
                "stock_forward_s": lambda: worker.ask("forward"),
                "stock_gradients_s": lambda: worker.ask("gradients"),
                "ort_training_forward_backward_s": lambda: seconds(lambda: stage.forward_backward({"input": x, "labels": y})),
                "pytorch_forward_backward_s": lambda: seconds(torch_run),
            }, args.rounds)
            worker.close()
            stock_version = worker.version
            row = {"method": method, "size": size, "batch": args.batch, "load_average": os.getloadavg()[0]}
            row.update({name: float(np.median(t)) for name, t in times.items()})
            grad, forward = np.array(times["stock_gradients_s"]), np.array(times["stock_forward_s"])
            row["backward_over_forward"] = float(np.median((grad - forward) / forward))
            row["over_pytorch"] = float(np.median(grad / np.array(times["pytorch_forward_backward_s"])))
            row["over_ort_training"] = float(np.median(grad / np.array(times["ort_training_forward_backward_s"])))
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_result("gradients", {
        "versions": {"onnxruntime_stock": stock_version, "onnxruntime_training": onnxruntime.__version__, "torch": torch.__version__},
        "threads": THREADS, "rounds": args.rounds, "statistic": "median of interleaved rounds (ratios: median of the rounds' ratios)",
        "rows": rows,
    })
    print("| method | size | forward (stock ORT) | gradient graph (stock ORT) | backward / forward | ORT Training fwd+bwd | PyTorch eager fwd+bwd | gradient graph / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size']} | {r['stock_forward_s']:.3f} s | {r['stock_gradients_s']:.3f} s | {r['backward_over_forward']:.2f}x | "
              f"{r['ort_training_forward_backward_s']:.3f} s | {r['pytorch_forward_backward_s']:.3f} s | {r['over_pytorch']:.2f}x |")


if __name__ == "__main__":
    main()
