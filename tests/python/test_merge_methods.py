"""End-to-end checks of `kdgraph merge` for KD, FitNet, AT, SP, CC, PKT, RKD and NST.

1. graph contract   the joint graph and its sidecar satisfy DESIGN.md / RUNTIMES.md
2. fidelity         every loss output equals kd_reference.py on the graph's own tap tensors
                    (two non-committed pairs), plus the loss subgraph alone on synthetic taps
3. ORT Training     artifacts from the sidecar train (with --gamma 0 the method's own term
                    falls; the graph as merged, under KDGRAPH_HEAVY=1, its loss); the teacher
                    stays bit-identical; the exported student reproduces the trained module's
                    eval logits
4. gradients        ORT Training's gradient of the student's first conv weight equals torch
                    autograd through the PyTorch models and kd_reference
5. degenerate       batch 1 (RKD, SP, CC) and all-zero images give finite losses and gradients

The committed pair (resnet56 eval -> resnet20 train) serves the training and gradient tests;
each merge runs once per session (conftest.merge) and each artifact set once per module.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kd_reference as R
import train_ort
from conftest import mf
from heavy import cases
from merge_checks import (
    COMMITTED, FID_RTOL, FIDELITY_BATCH, FIDELITY_PAIRS, GRAD_RTOL, NUM_CLASSES, TRAIN_BATCH, Joint,
    artifacts_factory, assert_finite_step, check_graph_contract, check_ort_training, check_taps_match_torch,
    compare_terms, first_student_conv_weight, float64_terms, image_batch, joint_factory, label_batch, linear_weight, loss_subgraph,
    method_id, new_stage, relative_error, run_with_taps, session_options, torch_taps,
)

METHODS = ["kd", "fitnet", "at", "sp", "cc", "pkt", "rkd", "nst"]
# A combination, for output order and the weighting of several terms.
COMBO = ["at", "kd", "rkd"]

# Fidelity: float32 graph vs float64 reference on the same float32 tap values, rtol 1e-4, no
# atol. On these untrained models the pooled post-ReLU embeddings and the Gram rows of a batch
# are nearly parallel, so some terms are near zero (SP 1e-5..1e-11, PKT ~1e-10) and are built
# from O(1) quantities (cosines ~1, G' entries ~0.5) whose float32 rounding, ~1e-8 absolute, is
# larger than the term itself: float32 cannot reach them, in the graph or in torch. Those terms
# (where the reference evaluated in float32 misses rtol) are compared in float64: the graph's
# own loss subgraph converted to float64 against the float64 reference, relative
# (compare_terms, merge_checks.float64_terms). Other terms are ill-conditioned in float32 but
# within reach (KD between nearly uniform logits: 1e-2 from log-probabilities ~-4.6):
# FLOAT32_FLOOR times |reference in float32 - reference in float64| is added to the tolerance
# (rounding in ORT and torch differs in order, not in size). test_loss_terms_on_synthetic_taps
# feeds the loss subgraph signed random taps on which every term is well conditioned (no
# floor), and test_rkd_accurate_in_float32 checks RKD, which a float32 graph can get right,
# without floor.


@pytest.fixture(scope="module")
def joint(merge):
    """joint(pair_id, methods, *extra_args) -> Joint, merged once per session."""
    return joint_factory(merge)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """artifacts(joint) -> its ORT Training artifact folder, generated once per joint graph."""
    return artifacts_factory(tmp_path_factory)


def expected_output_order(sidecar: dict) -> List[str]:
    """loss, loss/ce, loss/kd (KD or alpha > 0), loss/<method>..., the student's outputs."""
    methods = sidecar["methods"]
    names = ["loss", "loss/ce"]
    if sidecar["hyper"]["alpha"] > 0 or "kd" in methods:
        names.append("loss/kd")
    names += [f"loss/{m}" for m in methods if m != "kd"]
    return names + train_ort.student_outputs(sidecar)


# --------------------------------------------------------------------------- the reference


def fitnet_regressor(j: Joint, stage: str, to) -> dict:
    """The FitNet regressor's initial parameters (kd/fitnet/<stage>/regressor/...) as a kd_reference dict."""
    prefix = f"kd/fitnet/{stage}/regressor/"
    names = {
        "weight": "conv0.weight", "bias": "conv0.bias", "bn_gamma": "bn1.weight", "bn_beta": "bn1.bias",
        "bn_mean": "bn1.running_mean", "bn_var": "bn1.running_var",
    }
    return {key: to(j.array(prefix + suffix)) for key, suffix in names.items()}


def cc_embeds(j: Joint, stage: str, to):
    prefix = f"kd/cc/{stage}/"
    return (
        to(linear_weight(j, prefix + "embed/linear0.weight")), to(j.array(prefix + "embed/linear0.bias")),
        to(linear_weight(j, prefix + "teacher_embed/linear0.weight")), to(j.array(prefix + "teacher_embed/linear0.bias")),
    )


def reference_terms(
    j: Joint, values: Dict[str, torch.Tensor], labels: torch.Tensor, bn_batch_stats: bool, dtype=torch.float64
) -> Dict[str, torch.Tensor]:
    """Every loss output of `j` computed by kd_reference from tap values.

    values: {tensor name in the joint graph: float64 tensor} for every tap (teacher ones as
    `teacher/<name>`) and `logits` (converted to `dtype`); connector parameters are the graph's
    initial initializers;
    bn_batch_stats: how the FitNet regressor's BN normalises (False: running statistics, as an
    InferenceSession; True: batch statistics, as ORT Training).
    """
    sc = j.sidecar
    hyper = sc["hyper"]
    to = lambda a: torch.from_numpy(np.array(a)).to(dtype)
    values = {k: v.to(dtype) for k, v in values.items()}
    student_out = train_ort.student_outputs(sc)[0]
    out = {"loss/ce": R.ce(values[student_out], labels)}

    def tensors(method):
        pairs = j.pairs(method)
        assert pairs, f"{method}: the sidecar lists no pairs"
        return [(values[p["student"]["tensor"]], values["teacher/" + p["teacher"]["tensor"]]) for p in pairs]

    def single(method):
        pairs = tensors(method)
        assert len(pairs) == 1, f"{method} uses one pair, the sidecar lists {len(pairs)}"
        return pairs[0], j.pairs(method)[0]["stage"]

    for m in sc["methods"]:
        if m == "kd":
            (s, t), _ = single(m)
            out["loss/kd"] = R.kd(s, t, float(hyper["temperature"]))
        elif m == "fitnet":
            (s, t), stage = single(m)
            out["loss/fitnet"] = R.fitnet(s, t, fitnet_regressor(j, stage, to), bn_batch_stats=bn_batch_stats)
        elif m == "at":
            out["loss/at"] = R.at(tensors(m))
        elif m == "sp":
            (s, t), _ = single(m)
            out["loss/sp"] = R.sp(s, t)
        elif m == "cc":
            (s, t), stage = single(m)
            out["loss/cc"] = R.cc(s, t, *cc_embeds(j, stage, to))
        elif m == "pkt":
            (s, t), _ = single(m)
            out["loss/pkt"] = R.pkt(s, t)
        elif m == "rkd":
            (s, t), _ = single(m)
            out["loss/rkd"] = R.rkd(s, t)[0]
        elif m == "nst":
            out["loss/nst"] = R.nst(tensors(m))
        else:
            raise NotImplementedError(m)
    if "loss/kd" not in out and hyper["alpha"] > 0:
        out["loss/kd"] = R.kd(values[student_out], values["teacher/" + student_out], float(hyper["temperature"]))

    total = hyper["gamma"] * out["loss/ce"]
    if "loss/kd" in out:
        total = total + hyper["alpha"] * out["loss/kd"]
    for m in sc["methods"]:
        if m != "kd":
            assert m in hyper["beta"], f"sidecar hyper.beta has no weight for {m}: {hyper['beta']}"
            total = total + hyper["beta"][m] * out[f"loss/{m}"]
    out["loss"] = total
    return out


# --------------------------------------------------------------------------- 1. graph contract


CONTRACT_CASES = [[m] for m in METHODS] + [COMBO]


@pytest.mark.parametrize("methods", CONTRACT_CASES, ids=[method_id(c) for c in CONTRACT_CASES])
def test_graph_contract(joint, methods, kdgraph_version):
    j = joint(COMMITTED, methods)
    check_graph_contract(j, kdgraph_version, expected_output_order(j.sidecar), [("input", "float32"), ("labels", "int64")])
    assert j.sidecar["stages"] == [
        {"name": "main", "model": j.path.name, "sidecar": j.path.with_suffix(".json").name, "epochs": None, "carry_from": None}
    ], f"stages {j.sidecar['stages']}"


# --------------------------------------------------------------------------- 2. fidelity


FIDELITY_CASES = [(pair, [m]) for pair in FIDELITY_PAIRS for m in METHODS] + [(COMMITTED, COMBO)]


@pytest.mark.parametrize(
    "pair, methods", FIDELITY_CASES, ids=[f"{p}-{method_id(m)}" for p, m in FIDELITY_CASES]
)
def test_fidelity(joint, pair, methods):
    """Every loss output of an InferenceSession equals kd_reference on the graph's own taps."""
    j = joint(pair, methods)
    x, y = image_batch(FIDELITY_BATCH), label_batch(FIDELITY_BATCH)
    got = run_with_taps(j.model, j.tap_names(), {"input": x, "labels": y})
    values = {name: torch.from_numpy(got[name]).double() for name in j.tap_names()}
    want = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False)
    want32 = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False, dtype=torch.float32)
    compare_terms(j, got, want, FID_RTOL, 0.0, f"{pair} {method_id(methods)}, batch {FIDELITY_BATCH}", want32,
                  float64_terms(j, {**{n: got[n] for n in j.tap_names()}, "input": x, "labels": y}))


RKD_PAIRS = [COMMITTED] + FIDELITY_PAIRS


@pytest.mark.parametrize("pair", RKD_PAIRS)
def test_rkd_accurate_in_float32(joint, pair):
    """RKD on the models' real embeddings, to rtol 1e-4 of the float64 value (no float32 floor).

    The embeddings of a batch are close (pairwise distances 1e-6..1e-1 against norms 3..10 on
    these untrained models), so |e_i|^2 + |e_j|^2 - 2 e_i.e_j cancels catastrophically in
    float32 while the same distance computed from e_i - e_j does not; a float32 graph can
    reach this accuracy, and training depends on those distances.
    """
    j = joint(pair, "rkd")
    x, y = image_batch(FIDELITY_BATCH), label_batch(FIDELITY_BATCH)
    got = run_with_taps(j.model, j.tap_names(), {"input": x, "labels": y})
    values = {name: torch.from_numpy(got[name]).double() for name in j.tap_names()}
    want = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=False)
    (s, t), = [(values[p["student"]["tensor"]], values["teacher/" + p["teacher"]["tensor"]]) for p in j.pairs("rkd")]
    dist = lambda e: torch.cdist(e, e)[~torch.eye(len(e), dtype=torch.bool)]
    detail = (f"student min distance {float(dist(s).min()):.3g} at norm {float(s.norm(dim=1).mean()):.3g}, "
              f"teacher min distance {float(dist(t).min()):.3g} at norm {float(t.norm(dim=1).mean()):.3g}")
    w, g = float(want["loss/rkd"]), float(got["loss/rkd"])
    assert abs(g - w) <= FID_RTOL * abs(w), f"{pair} rkd: graph {g:.9g}, float64 reference {w:.9g} ({detail})"


SYNTHETIC_BATCH = 5  # not the tract check's 4, and odd (CC pairs adjacent samples)


@pytest.mark.parametrize(
    "pair, methods", [(p, [m]) for p in [COMMITTED] + FIDELITY_PAIRS for m in METHODS],
    ids=[f"{p}-{m}" for p in [COMMITTED] + FIDELITY_PAIRS for m in METHODS],
)
def test_loss_terms_on_synthetic_taps(joint, pair, methods):
    """The loss subgraph alone, fed signed random taps: all terms are far from 0 and must match."""
    j = joint(pair, methods)
    rng = np.random.RandomState(7)
    shapes = {}
    for p in j.sidecar["pairs"]:
        shapes[p["student"]["tensor"]] = p["student"]["shape"]
        shapes["teacher/" + p["teacher"]["tensor"]] = p["teacher"]["shape"]
    shapes.setdefault("logits", ["N", NUM_CLASSES])
    feeds = {}
    for name, shape in shapes.items():
        dims = [SYNTHETIC_BATCH if isinstance(d, str) else int(d) for d in shape]
        scale = 3.0 if dims[-1] == NUM_CLASSES and len(dims) == 2 else 1.0
        feeds[name] = (scale * rng.standard_normal(dims)).astype(np.float32)
    feeds["labels"] = label_batch(SYNTHETIC_BATCH)
    feeds["input"] = np.zeros((SYNTHETIC_BATCH, *mf.INPUT_SHAPE), np.float32)  # read only for its shape, if at all
    model = loss_subgraph(j, list(feeds))
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    used = {i.name for i in session.get_inputs()}
    got = dict(zip(j.loss_names, session.run(j.loss_names, {k: v for k, v in feeds.items() if k in used})))
    values = {k: torch.from_numpy(v).double() for k, v in feeds.items() if k not in ("labels", "input")}
    want = reference_terms(j, values, torch.from_numpy(feeds["labels"]), bn_batch_stats=False)
    compare_terms(j, got, want, FID_RTOL, 0.0, f"{pair} {method_id(methods)} on synthetic taps, batch {SYNTHETIC_BATCH}")


# --------------------------------------------------------------------------- 3. ORT Training


# gamma0 is the stricter case (the method's own term must fall) and checks the teacher and the
# export as well; the graph as merged runs under KDGRAPH_HEAVY=1.
TRAIN_CASES = cases([(m, w) for m in METHODS for w in ("default", "gamma0")], lambda c: c[1] == "gamma0", "-".join)


@pytest.mark.parametrize("method, weights", TRAIN_CASES)
def test_ort_training(joint, artifacts, method, weights, tmp_path):
    """Loss falls in TRAIN_STEPS steps, the teacher stays bit-identical, the exported student matches.

    default: the merged graph as is (its loss holds CE, which falls on one batch whatever the
    method does); gamma0: `--gamma 0`, where the method's own term must fall (by TERM_FALL).
    """
    extra = () if weights == "default" else ("--gamma", "0")
    j = joint(COMMITTED, method, *extra)
    feeds = {"input": image_batch(TRAIN_BATCH), "labels": label_batch(TRAIN_BATCH)}
    term = f"loss/{method}" if weights == "gamma0" else None
    check_ort_training(j, artifacts(j), feeds, tmp_path, first_student_conv_weight(j), term)


# --------------------------------------------------------------------------- 4. gradients


GRAD_CASES = [(m, w) for m in METHODS for w in ("default", "gamma0")]


@pytest.mark.parametrize("method, weights", GRAD_CASES, ids=[f"{m}-{w}" for m, w in GRAD_CASES])
def test_gradient_matches_torch(joint, artifacts, method, weights):
    """ORT Training's gradient of the first student conv weight vs torch autograd.

    default: the merged loss as is; gamma0: `--gamma 0`, the method's own term alone (CE would
    otherwise dominate the gradient of small terms such as SP or PKT).
    """
    extra = () if weights == "default" else ("--gamma", "0")
    j = joint(COMMITTED, method, *extra)
    seed = 3
    x, y = image_batch(TRAIN_BATCH, seed), label_batch(TRAIN_BATCH, seed)

    check_taps_match_torch(j, x, y, seed)
    session = new_stage(j, artifacts(j))
    conv = first_student_conv_weight(j)
    outputs = session.forward_backward({"input": x, "labels": y})
    got = session.gradient(conv)
    assert got is not None, f"no gradient for `{conv}`"

    values, student = torch_taps(j, x, seed, train=True)
    terms = reference_terms(j, values, torch.from_numpy(y), bn_batch_stats=True)
    # The forward values agree too (batch-statistics BN on both sides). The taps themselves come
    # from different float32 / float64 networks here, hence rtol 1e-3 (as test_fixture_taps'
    # train tolerance), plus the float32 floor of the formula (see compare_terms).
    detached = {k: v.detach() for k, v in values.items()}
    terms32 = reference_terms(j, detached, torch.from_numpy(y), bn_batch_stats=True, dtype=torch.float32)
    compare_terms(j, outputs, {k: v.detach() for k, v in terms.items()}, 1e-3, 1e-7,
                  f"{method} {weights}: training forward vs torch", terms32)
    params = dict(student.named_parameters())
    assert conv in params, f"`{conv}` is not a parameter of the torch student ({list(params)[:5]}...)"
    (want,) = torch.autograd.grad(terms["loss"], params[conv])
    rel = relative_error(got, want.numpy())
    assert rel < GRAD_RTOL, (
        f"{method} {weights}: gradient of `{conv}` rel err {rel:.3g} (|ort| {np.linalg.norm(got):.6g}, "
        f"|torch| {np.linalg.norm(want):.6g})"
    )


# --------------------------------------------------------------------------- 5. degenerate batches


@pytest.mark.parametrize("method", ["rkd", "sp", "cc"])
def test_batch_of_one(joint, method):
    """kdgraph documents RKD, SP and CC as 0 at batch 1; every loss output must be finite."""
    j = joint(COMMITTED, method)
    got = run_with_taps(j.model, [], {"input": image_batch(1), "labels": label_batch(1)})
    bad = {n: float(got[n]) for n in j.loss_names if not np.isfinite(got[n])}
    assert not bad, f"{method} at batch 1: non-finite {bad}"
    assert float(got[f"loss/{method}"]) == 0.0, f"{method} at batch 1: term {float(got[f'loss/{method}'])}, documented 0"


@pytest.mark.parametrize("method", ["rkd", "sp", "cc"])
def test_batch_of_one_gradients(joint, artifacts, method):
    """ORT Training at batch 1: the loss and every trainable parameter's gradient are finite."""
    j = joint(COMMITTED, method)
    assert_finite_step(new_stage(j, artifacts(j)), {"input": image_batch(1), "labels": label_batch(1)}, f"{method} batch 1")


@pytest.mark.parametrize("method", METHODS)
def test_zero_images(joint, artifacts, method):
    """All-zero images: finite loss terms in an InferenceSession, finite gradients in ORT Training."""
    j = joint(COMMITTED, method)
    feeds = {"input": np.zeros((FIDELITY_BATCH, *mf.INPUT_SHAPE), np.float32), "labels": label_batch(FIDELITY_BATCH)}
    got = run_with_taps(j.model, [], feeds)
    bad = {n: float(got[n]) for n in j.loss_names if not np.isfinite(got[n])}
    assert not bad, f"{method} on zero images: non-finite {bad}"
    assert_finite_step(new_stage(j, artifacts(j)), feeds, f"{method} on zero images")
