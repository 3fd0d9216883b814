"""The training-parity cases of issue 12 (check 1), shared by the main suite, which writes them, and tests/python_ort, which judges stock onnxruntime on them; numpy only.

For every method on the committed pair, `kdgraph merge --emit step` and SAMPLES noise images
(a fixed data set: kdgraph train's seeded order, every route on the batches its log lists), STEPS
steps of every stage (AB, FT, FSP: the init stage, then the main stage from its result) at lr LR.
The main suite (tests/python/test_train_parity.py) trains with kdgraph train (tract), ORT
Training and PyTorch, and writes CASES/<method>/:

  the merged graphs and sidecars, data.npz, kdgraph's log (log.jsonl)
  torch.json     PyTorch's loss terms per stage and step
  torch.npz      PyTorch's final student values (parameters; running statistics where compared)
  case.json      written last: the kdgraph build, and which values torch.npz holds

tests/python_ort/test_train_parity.py runs examples/train_onnxruntime.py on the case and
compares it with the same references.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

import gradient_cases as gc

CASES = gc.HERE / ".cache" / "parity"
# Every method under KDGRAPH_HEAVY=1 (measured on 2 busy cores: 8 minutes here, 2 in
# tests/python_ort); by default CRD (the state it carries) and FT (an init stage whose result the
# main stage keeps frozen): 2 minutes and 10 seconds.
METHODS = gc.METHODS if gc.HEAVY else ("ft", "crd")

# Where a route misses and why (measured under KDGRAPH_HEAVY=1; the tests mark these xfail, not
# strict, so that they show in every run's summary):
KNOWN_MISSES = {
    # PKT's term here is ~1e-5, computed from cosines ~1 whose float32 rounding (~6e-8) is ~1e-2 of
    # it: at step 1, from the same initial weights, tract gives 1.40418e-5 against float64's
    # 1.40222e-5 (1.4e-3), torch's float32 run 7e-5; later steps 3e-3 to 1.7e-2 in tract, ORT
    # Training and onnxruntime alike, beyond 4x torch float32's own floor (one run's luck, not a
    # bound). The parameters agree (2.4e-4 at most).
    "pkt": "PKT's ~1e-5 term is below float32's reach from cosines ~1 (1.4e-3 at step 1 from the same weights)",
    # tract's trajectory parts from the others: its parameters end 1.4e-4 from PyTorch's (ORT
    # Training 5e-6, onnxruntime 9e-7) and its RKD term by 1.7e-3 at step 9, 9e-3 at step 19. The
    # graph is right where tract stands: the float64 reference at tract's own weights after 8 and
    # 19 steps gives its terms to 1.6e-6 and 6.5e-6. What differs is how its float32 update
    # rounds; RKD's distances between nearly parallel embeddings amplify it.
    "rkd": "on tract the RKD trajectory parts from float64 (term 9e-3 at step 19; at its own weights the term is right to 7e-6)",
}

BATCH, SAMPLES, STEPS = 4, 8, 20
CLASSES = 100
CRD_NEGATIVES = 4
# AdamW at 5e-5: a float32 runtime and float64 torch keep together for 20 steps. AdamW's update is
# about +-lr wherever a gradient is small, whatever its size, so where float32 rounding flips such
# a gradient the trajectories part, and batch-4 BatchNorm amplifies what differs. At 1e-4 they
# part by 1.0e-3 to 1.4e-3 by steps 16-20 (measured on this data: FitNet's layer3 conv weights in
# onnxruntime 1.13e-3, AT's term 1.44e-3, KD's running means 1.09e-3; tract and ORT Training
# alike), at 1e-3 by ~2e-3 in the losses (tests/python/test_train_tract.py).
LR = 5e-5
LOSS_RTOL = 1e-3
WEIGHT_RTOL = 1e-3
# BatchNorm running statistics follow the batch means of layers that rounding already moved:
# onnxruntime against itself with the initial weights perturbed by 1e-6 (relative) differs by
# 5e-3 in them after 20 steps (test_train_tract.py measured it); they get that tolerance.
STATISTICS_RTOL = 1e-2

MAIN_SUITE = ".venv/bin/python -m pytest tests/python/test_train_parity.py"


def merge_args(method: str) -> List[str]:
    crd = ["--crd-n-data", str(SAMPLES), "--crd-negatives", str(CRD_NEGATIVES)] if method == "crd" else []
    return [*crd, "--emit", "step"]


def train_args(sidecar: Path, data: Path, out: Path) -> List[str]:
    """The arguments kdgraph train and examples/train_onnxruntime.py both take."""
    return [str(sidecar), "--data", str(data), "--batch", str(BATCH), "--steps", str(STEPS), "--init-steps", str(STEPS),
            "--lr", str(LR), "-o", str(out / "student.onnx"), "--log", str(out / "log.jsonl")]


def image_data(path: Path, seed: int = 0) -> Path:
    """SAMPLES images unlike each other: smooth random patterns (4x4 noise blown up to 32x32) at
    random contrast and brightness per image and channel. On white noise the untrained students'
    pooled embeddings are nearly parallel (each channel averages the same statistics), so the
    relational terms (RKD, PKT, SP) are near zero or ill-conditioned: float32 rounding then moves
    them by more than the tolerance (PKT ~1e-10 is built from cosines ~1)."""
    rng = np.random.default_rng(seed)
    pattern = np.kron(rng.standard_normal((SAMPLES, 3, 4, 4)), np.ones((8, 8)))
    contrast = rng.uniform(0.3, 2.0, (SAMPLES, 3, 1, 1))
    brightness = rng.uniform(-1.0, 1.0, (SAMPLES, 3, 1, 1))
    x = (pattern * contrast + brightness + 0.1 * rng.standard_normal((SAMPLES, 3, 32, 32))).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, CLASSES, SAMPLES))
    return path


def read_log(path: Path) -> Dict[Tuple[str, int], dict]:
    """{(stage, step): the log line} of a trainer's --log."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {(line["stage"], line["step"]): line for line in lines if "step" in line}


# Where float32 itself cannot follow the float64 reference, the tolerance grows by FLOAT32_FLOOR
# times how far PyTorch's own float32 run (the same reference, the same batches) is from its
# float64 run, at that step or in that weight: merge_checks' rule for loss terms, applied to
# trajectories. Two float32 runs part from float64 (and from each other) by about as much
# (measured: FT's main stage, tract and ORT Training 1e-3 to 2e-2 from float64 torch by steps
# 11-18, torch's float32 run 1e-3 to 2.3e-3 from it; AB and FSP weights after 40 steps, tract,
# ORT Training and float64 torch ~2e-3 apart pairwise; PKT's term ~1e-5 misses 1e-3 at step 1,
# from the same weights: cosines ~1 in float32).
FLOAT32_FLOOR = 4.0


def loss_mismatches(got: Dict[Tuple[str, int], dict], want: Dict[Tuple[str, int], dict], names: Dict[str, List[str]],
                    rtol: float = LOSS_RTOL) -> List[str]:
    """One line per (stage, step, loss output) where `got` is not within `rtol` of `want` plus
    FLOAT32_FLOOR times want's `floor` (names: the loss outputs of each stage)."""
    assert sorted(got) == sorted(want), f"steps {sorted(got)[:3]}... vs {sorted(want)[:3]}..."
    bad = []
    for key in sorted(want, key=lambda k: (k[0] != "init", k[1])):
        for name in names[key[0]]:
            g, w = float(got[key][name]), float(want[key][name])
            floor = want[key].get("floor", {}).get(name, 0.0)
            if not abs(g - w) <= rtol * abs(w) + FLOAT32_FLOOR * floor:
                bad.append(f"{key[0]} step {key[1]} {name}: {g:.7g} vs {w:.7g} (rel {abs(g - w) / abs(w):.2e}, "
                           f"float32 floor {floor / abs(w):.2e})")
    return bad


def weight_mismatches(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray], floor: Dict[str, float]) -> List[str]:
    """One line per value of `want` whose counterpart in `got` is off by more than WEIGHT_RTOL
    (running statistics: STATISTICS_RTOL), or FLOAT32_FLOOR * floor[name] where larger, in
    ||got - want|| / ||want||."""
    bad = []
    for name, w in want.items():
        error = gc.relative_error(got[name], w)
        rtol = STATISTICS_RTOL if name.endswith(("running_mean", "running_var")) else WEIGHT_RTOL
        rtol = max(rtol, FLOAT32_FLOOR * floor.get(name, 0.0))
        if not error <= rtol:
            bad.append(f"{name}: rel {error:.2e}")
    return sorted(bad, key=lambda line: -float(line.rsplit(" ", 1)[1]))


def loss_names(sidecar: dict) -> List[str]:
    return [o["name"] for o in sidecar["outputs"] if o["role"] in ("loss", "term")]


def stage_sidecars(joint_json: Path) -> List[dict]:
    """Every stage's sidecar, in training order (the main stage last), with `path` added."""
    main = json.loads(Path(joint_json).read_text())
    out = []
    for entry in main["stages"]:
        path = Path(joint_json).parent / entry["sidecar"]
        sidecar = json.loads(path.read_text())
        sidecar["path"] = str(path)
        out.append(sidecar)
    return sorted(out, key=lambda s: s["stage"] == main["stage"])


def worst(got_losses, want_losses, names, got_weights, want_weights) -> dict:
    """The largest relative differences of a route from PyTorch: in a loss output, in a parameter,
    in a running statistic; and the largest float32 floor of a loss output."""
    losses = [abs(float(got_losses[k][n]) - float(w[n])) / abs(float(w[n])) for k, w in want_losses.items() for n in names[k[0]]]
    floors = [w.get("floor", {}).get(n, 0.0) / abs(float(w[n])) for k, w in want_losses.items() for n in names[k[0]]]
    errors = {n: gc.relative_error(got_weights[n], w) for n, w in want_weights.items()}
    statistics = [e for n, e in errors.items() if n.endswith(("running_mean", "running_var"))]
    parameters = [e for n, e in errors.items() if not n.endswith(("running_mean", "running_var"))]
    return {"loss": max(losses), "parameter": max(parameters, default=0.0), "statistic": max(statistics, default=0.0),
            "loss_floor": max(floors)}


def record(method: str, route: str, errors: dict):
    """Adds a route's worst differences to CASES/worst.json (what bench and README quote)."""
    path = CASES / "worst.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(method, {})[route] = errors
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
