"""End-to-end checks of the resizing paths: FitNet's size-matching regressors (stride-2 conv3x3,
nearest x2 + conv3x3, the (1+s-t)-kernel conv) and the adaptive pooling of AT, NST, OFD and FSP
(Reshape + ReduceMean where the sizes divide, a constant pooling matrix where they do not; on the
student side and on the teacher side).

The pairs are plain nets (fixtures/make_fixtures.py PlainNet) whose stage sizes after the 32x32
stem are 16-8-4, 24-16-8 and 16-12-6, so the paths each case takes follow from SIZES, not from
kdgraph. Every case is merged with `--gamma 0` (the method's term is the whole loss; FSP's init
stage is its term anyway), and checked four ways:

1. paths         the graph holds the regressor / pooling the sizes call for (test_case_paths),
                 and the cases together cover every path (test_cases_cover_every_path)
2. fidelity      every loss output of an InferenceSession equals kd_reference on the graph's taps
3. tract         `kdgraph check` prints the terms kd_reference gives on the inputs it feeds
                 (src/check.rs's seeded generator, reproduced here)
4. ORT Training  the term falls in TRAIN_STEPS steps (merge_checks), and the gradients
                 of the first student conv and of every added parameter equal torch autograd
"""

from __future__ import annotations

import re
import subprocess
from typing import Dict, List, Optional

import numpy as np
import onnx
import pytest
import torch

import kd_reference as R
from merge_checks import (
    FID_RTOL, FIDELITY_BATCH, GRAD_RTOL, PAIRS, TRAIN_BATCH, Joint, artifacts_factory, check_graph_contract,
    check_ort_training, check_taps_match_torch, compare_terms, first_student_conv_weight, float64_terms, image_batch,
    joint_factory, label_batch, new_stage, relative_error, run_with_taps, torch_taps,
)
from test_merge_stages import GAMMA0, GraphParams, ofd_reference_margin

A, B, C = "plain_16_8_4", "plain_24_16_8", "plain_16_12_6"
# Spatial size of each map (stem, stage1, stage2, stage3), from the nets' convs (make_fixtures.py).
SIZES = {A: [32, 16, 8, 4], B: [32, 24, 16, 8], C: [32, 16, 12, 6]}
STAGES = ["stem", "stage1", "stage2", "stage3"]
FITNET_HINT = 2  # feat[2]

CASES = [
    # FitNet's three resizing regressors: student twice, half, and 12/8 of the teacher's size.
    (f"{A}-{B}", "fitnet", "main"),
    (f"{B}-{A}", "fitnet", "main"),
    (f"{A}-{C}", "fitnet", "main"),
] + [
    # Stage ends pooled on the student side (A -> B) and on the teacher side (B -> A), each with a
    # pair that does not divide (24 vs 16) and two that do.
    (pair, method, "main") for method in ("at", "nst", "ofd") for pair in (f"{A}-{B}", f"{B}-{A}")
] + [
    # Consecutive maps of each net pooled: B's 32 -> 24 -> 16 do not divide, A's do.
    (f"{A}-{B}", "fsp", "init"),
    (f"{B}-{A}", "fsp", "init"),
]


def case_id(case) -> str:
    return "-".join(case)


def nets(pair: str):
    return tuple(name for name, _ in PAIRS[pair])


@pytest.fixture(scope="module")
def joint(merge):
    return joint_factory(merge)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return artifacts_factory(tmp_path_factory)


def case_joint(joint, pair: str, method: str, stage: str) -> Joint:
    return joint(pair, method, *GAMMA0).stage(stage)


# --------------------------------------------------------------------------- expected paths


def fitnet_regressor(pair: str) -> str:
    """METHODS.md 2 on the hint sizes: 'stride2' (s = 2t), 'upsample' (2s = t), else 'kernel<k>'."""
    teacher, student = nets(pair)
    t, s = SIZES[teacher][FITNET_HINT], SIZES[student][FITNET_HINT]
    if s == 2 * t:
        return "stride2"
    if 2 * s == t:
        return "upsample"
    assert s > t, (s, t)
    return f"kernel{1 + s - t}"


def pools(pair: str, method: str) -> Dict[str, tuple]:
    """{pool scope in the graph: (side, 'divisible' or 'matrix')} that the sizes call for."""
    teacher, student = nets(pair)
    found = {}
    if method == "fsp":  # within each net, the larger of two consecutive maps pooled to the smaller
        for side, net in (("teacher", teacher), ("student", student)):
            for k in range(len(STAGES) - 1):
                big, small = SIZES[net][k], SIZES[net][k + 1]
                if big != small:
                    scope = f"kd/fsp/{STAGES[k]}_{STAGES[k + 1]}/{side}/bottom_pooled"
                    found[scope] = (side, "divisible" if big % small == 0 else "matrix")
        return found
    for k in range(1, len(STAGES)):  # stage ends after the stem
        t, s = SIZES[teacher][k], SIZES[student][k]
        if t != s:
            side = "teacher" if t > s else "student"
            found[f"kd/{method}/{STAGES[k]}/{side}_pool"] = (side, "divisible" if max(t, s) % min(t, s) == 0 else "matrix")
    return found


def test_cases_cover_every_path():
    """The cases take FitNet's three resizing regressors, and for AT, NST, OFD and FSP both pooling
    forms on both sides."""
    assert sorted(fitnet_regressor(p) for p, m, _ in CASES if m == "fitnet") == ["kernel5", "stride2", "upsample"]
    for method in ("at", "nst", "ofd", "fsp"):
        paths = {path for p, m, _ in CASES if m == method for path in pools(p, method).values()}
        want = {(side, kind) for side in ("teacher", "student") for kind in ("divisible", "matrix")}
        assert paths == want, f"{method}: the cases pool {sorted(paths)}"


@pytest.mark.parametrize("pair, method, stage", CASES, ids=[case_id(c) for c in CASES])
def test_case_paths(joint, pair, method, stage, kdgraph_version):
    """The graph contract, and the regressor / pools the sizes call for: a MatMul with a constant
    pooling matrix where the sizes do not divide, Reshape + ReduceMean where they do."""
    j = case_joint(joint, pair, method, stage)
    outputs = ["loss", f"loss/{method}"] if stage == "init" else ["loss", "loss/ce", f"loss/{method}", "logits"]
    inputs = [("input", "float32")] + ([] if stage == "init" else [("labels", "int64")])
    check_graph_contract(j, kdgraph_version, outputs, inputs)
    g = j.model.graph
    if method == "fitnet":
        (p,) = j.pairs("fitnet")
        assert p["stage"] == STAGES[FITNET_HINT] and p["pool"] is None, p
        convs = [n for n in g.node if n.op_type == "Conv" and n.name.startswith("kd/fitnet/")]
        assert len(convs) == 1, [n.name for n in convs]
        attrs = {a.name: list(a.ints) for a in convs[0].attribute}
        upsampled = any(n.name.startswith("kd/fitnet/") and "/upsample" in n.name for n in g.node)
        kind = fitnet_regressor(pair)
        if kind == "stride2":
            want = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        elif kind == "upsample":
            want = {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}
        else:
            k = int(kind[len("kernel"):])
            want = {"kernel_shape": [k, k], "strides": [1, 1], "pads": [0, 0, 0, 0]}
        assert {a: attrs.get(a) for a in want} == want and upsampled == (kind == "upsample"), (
            f"{pair}: a {kind} regressor expected, the graph has {attrs}, upsampling {upsampled}")
        return
    inits = {i.name for i in g.initializer}
    expected = pools(pair, method)
    for scope, (side, kind) in expected.items():
        ops = {n.op_type for n in g.node if n.name.startswith(scope + "/")}
        has_matrix = f"{scope}/matrix" in inits
        if kind == "matrix":
            assert has_matrix and "MatMul" in ops, f"{scope}: a pooling matrix expected, ops {sorted(ops)}"
        else:
            assert not has_matrix and "ReduceMean" in ops, f"{scope}: Reshape + ReduceMean expected, ops {sorted(ops)}"
    written = {n.name.rsplit("/", 1)[0] for n in g.node if re.search(r"_pool(ed)?/", n.name)}
    assert written == set(expected), f"pools written {sorted(written)}, expected {sorted(expected)}"


# --------------------------------------------------------------------------- the reference


def reference_terms(j: Joint, values: Dict[str, torch.Tensor], labels: Optional[np.ndarray], bn_batch_stats: bool,
                    dtype=torch.float64, params: Optional[GraphParams] = None) -> Dict[str, torch.Tensor]:
    """Every loss output of `j` by kd_reference from the tap values (pooling by
    F.adaptive_avg_pool2d in kd_reference.pool_pair; connector parameters from `params`, by default
    the graph's initial initializers)."""
    method = j.methods[0]
    params = params or GraphParams(j, dtype)
    values = {k: v.to(dtype) for k, v in values.items()}
    pairs = j.pairs(method)
    taps = [(values.get(p["student"]["tensor"]), values.get("teacher/" + p["teacher"]["tensor"])) for p in pairs]
    term = f"loss/{method}"
    out = {}
    if method == "fitnet":
        ((s, t),) = taps
        regressor = params.convs(f"kd/fitnet/{pairs[0]['stage']}/regressor/", 1, True)[0]
        out[term] = R.fitnet(s, t, regressor, bn_batch_stats=bn_batch_stats)
    elif method == "at":
        out[term] = R.at(taps)
    elif method == "nst":
        out[term] = R.nst(taps)
    elif method == "fsp":
        out[term] = R.fsp([s for s, _ in taps], [t for _, t in taps])
    elif method == "ofd":
        connectors = [params.convs(f"kd/ofd/{p['stage']}/connector/", 1, True)[0] for p in pairs]
        # A folded teacher's margins are estimated from the teacher map as the loss sees it: pooled.
        margins = [ofd_reference_margin(j, p, R.pool_pair(t, s)[0]) for p, (s, t) in zip(pairs, taps)]
        out[term] = R.ofd(taps, connectors, margins, reduction="batch", bn_batch_stats=bn_batch_stats, pool=True)
    else:
        raise NotImplementedError(method)
    if j.stage_name == "init":
        out["loss"] = out[term]
        return out
    hyper = j.sidecar["hyper"]
    out["loss/ce"] = R.ce(values[j.student_outputs[0]], torch.from_numpy(labels))
    out["loss"] = hyper["gamma"] * out["loss/ce"] + hyper["beta"][method] * out[term]
    return out


def graph_tap_names(j: Joint) -> List[str]:
    """The taps the reference reads that the graph computes (an init graph has no logits)."""
    computed = {o for n in j.model.graph.node for o in n.output}
    return [n for n in j.tap_names() if n in computed]


def check_against_reference(j: Joint, feeds: Dict[str, np.ndarray], got: Dict[str, float], what: str, float64: bool):
    """`got` (loss outputs) vs kd_reference on the taps an InferenceSession computes from `feeds`."""
    taps = run_with_taps(j.model, graph_tap_names(j), feeds)
    values = {n: torch.from_numpy(taps[n]).double() for n in graph_tap_names(j)}
    want = reference_terms(j, values, feeds.get("labels"), bn_batch_stats=False)
    want32 = reference_terms(j, values, feeds.get("labels"), bn_batch_stats=False, dtype=torch.float32)
    f64 = float64_terms(j, {**feeds, **{n: taps[n] for n in graph_tap_names(j)}}) if float64 else None
    compare_terms(j, got, want, FID_RTOL, 0.0, what, want32, f64)


def graph_feeds(j: Joint, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
    feeds = {"input": image_batch(batch, seed)}
    if j.stage_name == "main":
        feeds["labels"] = label_batch(batch, seed)
    return feeds


# --------------------------------------------------------------------------- 2. fidelity


@pytest.mark.parametrize("pair, method, stage", CASES, ids=[case_id(c) for c in CASES])
def test_fidelity(joint, pair, method, stage):
    """Every loss output of an InferenceSession equals kd_reference on the graph's own taps."""
    j = case_joint(joint, pair, method, stage)
    feeds = graph_feeds(j, FIDELITY_BATCH)
    got = run_with_taps(j.model, [], feeds)
    check_against_reference(j, feeds, got, f"{case_id((pair, method, stage))}, batch {FIDELITY_BATCH}", float64=True)


# --------------------------------------------------------------------------- 3. tract


TRACT_BATCH = 3  # not the fidelity batch, and odd


def tract_feeds(j: Joint, batch: int) -> Dict[str, np.ndarray]:
    """The inputs `kdgraph check --batch <batch>` feeds the graph (src/check.rs): every symbolic dim
    set to the batch; float inputs from a xorshift64 generator seeded with 0x2545F4914F6CDD1D xor the
    input's index, mapped to [-1, 1); labels i % classes (the logits' last dim)."""
    mask = (1 << 64) - 1
    classes = next((o.type.tensor_type.shape.dim[1].dim_value for o in j.model.graph.output
                    if len(o.type.tensor_type.shape.dim) == 2 and o.type.tensor_type.shape.dim[1].dim_value > 0), 10)
    inits = {i.name for i in j.model.graph.initializer}
    feeds = {}
    for index, value in enumerate(i for i in j.model.graph.input if i.name not in inits):
        dims = [d.dim_value if d.dim_value > 0 else batch for d in value.type.tensor_type.shape.dim]
        count = int(np.prod(dims))
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            assert value.name == "labels", f"no tract feed reproduced for int64 input `{value.name}`"
            feeds[value.name] = (np.arange(count) % classes).reshape(dims).astype(np.int64)
            continue
        state, data = 0x2545F4914F6CDD1D ^ index, np.empty(count, np.float64)
        for k in range(count):
            state ^= (state << 13) & mask
            state ^= state >> 7
            state ^= (state << 17) & mask
            data[k] = (state >> 40) / float(1 << 24) * 2.0 - 1.0  # exact in float32, as tract computes it
        feeds[value.name] = data.astype(np.float32).reshape(dims)
    return feeds


@pytest.mark.parametrize("pair, method, stage", CASES, ids=[case_id(c) for c in CASES])
def test_tract_check(joint, kdgraph_bin, pair, method, stage):
    """`kdgraph check` (tract) prints every loss output, each equal to kd_reference on the taps of its inputs."""
    j = case_joint(joint, pair, method, stage)
    result = subprocess.run([str(kdgraph_bin), "check", str(j.path), "--batch", str(TRACT_BATCH)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"kdgraph check: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    printed = dict(re.findall(r"^\s+(\S+)\s+(\S+)$", result.stdout, re.M))
    assert list(printed) == j.loss_names, f"kdgraph check printed {list(printed)}, the loss outputs are {j.loss_names}"
    got = {n: float(v) for n, v in printed.items()}
    check_against_reference(j, tract_feeds(j, TRACT_BATCH), got, f"tract on {case_id((pair, method, stage))}", float64=False)


# --------------------------------------------------------------------------- 4. ORT Training


@pytest.mark.parametrize("pair, method, stage", CASES, ids=[case_id(c) for c in CASES])
def test_ort_training(joint, artifacts, pair, method, stage, tmp_path):
    """The term falls in TRAIN_STEPS steps, the teacher stays bit-identical, the exported student matches."""
    j = case_joint(joint, pair, method, stage)
    check_ort_training(j, artifacts(j), graph_feeds(j, TRAIN_BATCH), tmp_path, first_student_conv_weight(j), f"loss/{method}")


@pytest.mark.parametrize("pair, method, stage", CASES, ids=[case_id(c) for c in CASES])
def test_gradient_matches_torch(joint, artifacts, pair, method, stage):
    """ORT Training's gradients of the first student conv and of every added parameter equal torch
    autograd through the PyTorch student (batch statistics) and kd_reference: the gradient goes back
    through the regressors and through the student-side pools."""
    j = case_joint(joint, pair, method, stage)
    seed = 3
    feeds = graph_feeds(j, TRAIN_BATCH, seed)
    x = feeds["input"]
    check_taps_match_torch(j, x, label_batch(TRAIN_BATCH, seed), seed)
    session = new_stage(j, artifacts(j))
    outputs = session.forward_backward(feeds)

    values, student = torch_taps(j, x, seed, train=True)
    params = GraphParams(j, torch.float64, grad=True)
    terms = reference_terms(j, values, feeds.get("labels"), bn_batch_stats=True, params=params)
    what = case_id((pair, method, stage))
    detached = {k: v.detach() for k, v in values.items()}
    terms32 = reference_terms(j, detached, feeds.get("labels"), bn_batch_stats=True, dtype=torch.float32)
    compare_terms(j, outputs, {k: v.detach() for k, v in terms.items()}, 1e-3, 0.0, f"{what}: training forward vs torch", terms32)

    conv = first_student_conv_weight(j)
    wanted = {**params.trainable_leaves(), conv: dict(student.named_parameters())[conv]}
    grads = torch.autograd.grad(terms["loss"], list(wanted.values()), allow_unused=True)
    want = {n: (np.zeros(tuple(t.shape)) if g is None else g.numpy()) for (n, t), g in zip(wanted.items(), grads)}
    want = {n: (params.to_graph(n, g) if n in params.leaves else g) for n, g in want.items()}
    scale = max(np.linalg.norm(g) for g in want.values())
    failures = []
    for name, w in want.items():
        got = session.gradient(name)
        assert got is not None, f"{what}: no ORT gradient for `{name}`"
        if np.linalg.norm(w) <= 1e-7 * scale:  # a conv bias before a batch-statistics BN: 0 in exact arithmetic
            if np.linalg.norm(got) > 1e-5 * scale:
                failures.append(f"`{name}`: |ort| {np.linalg.norm(got):.3g}, torch ~0 (scale {scale:.3g})")
            continue
        rel = relative_error(got, w)
        if not rel < GRAD_RTOL:
            failures.append(f"`{name}`: rel err {rel:.3g} (|ort| {np.linalg.norm(got):.6g}, |torch| {np.linalg.norm(w):.6g})")
    assert not failures, f"{what}: gradients vs torch autograd (rtol {GRAD_RTOL}):\n  " + "\n  ".join(failures)
