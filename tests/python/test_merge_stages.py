"""End-to-end checks of `kdgraph merge` for VID, AB, FT, FSP, CRD and OFD, init stages included.

AB, FSP and FT write two graphs (joint.init.onnx, trained first, then joint.onnx); CRD carries
memory banks and its normalisers Z as state; OFD clips the teacher at margins taken from its
BatchNorms (a teacher exported in train mode) or estimated from the batch (eval mode).

1. graph contract   every written graph (init and main) and its sidecar satisfy DESIGN.md /
                    RUNTIMES.md; method specifics (VID's log_scale, FT's constant paraphraser,
                    CRD's state, OFD's connector and margins, FSP's channel check)
2. fidelity         every loss output (and CRD's state outputs) equals kd_reference.py on the
                    graph's own taps, on two non-committed pairs, and the loss subgraph alone on
                    synthetic taps
3. ORT Training     every stage graph trains on the committed pair (the loss falls; the
                    method's term falls where it is the whole loss: init stages, --gamma 0);
                    the teacher stays bit-identical; the exported student reproduces the
                    eval-mode module
4. gradients        ORT Training's gradients (first student conv, every added parameter) equal
                    torch autograd: main stage of VID, FT, CRD, OFD; init stage of AB, FSP, FT
5. degenerate       all-zero images and batch 1: finite losses and gradients
6. the example      examples/train_ort.py trains init then main (AB, FSP, FT), carrying the
                    trained parameters by name, and CRD with its memories fed back
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import kd_reference as R
import train_ort
from conftest import ROOT, fixture_path, mf
from heavy import cases
from merge_checks import (
    COMMITTED, CRD_ARGS, CRD_K, CRD_N, FID_RTOL, FIDELITY_BATCH, FIDELITY_PAIRS, GRAD_RTOL, PAIRS, TRAIN_BATCH, Joint,
    artifacts_factory, assert_finite_step, check_graph_contract, check_ort_training, check_taps_match_torch,
    compare_terms, crd_feeds, first_student_conv_weight, float64_terms, graph_feeds, image_batch, joint_factory,
    label_batch, linear_weight, loss_subgraph, merge_args, new_stage, relative_error, run_with_taps, session_options,
    torch_taps,
)

METHODS = ["vid", "ab", "ft", "fsp", "crd", "ofd"]
INIT_METHODS = {"ab", "ft", "fsp"}
CRD_INPUTS = ["kd/crd/index", "kd/crd/contrast_index", "kd/crd/memory_student", "kd/crd/memory_teacher", "kd/crd/z"]
CRD_STATE_OUTPUTS = ["kd/crd/memory_student_next", "kd/crd/memory_teacher_next", "kd/crd/z_next"]
# Methods whose main stage has no term of their own (CE, + KD with alpha > 0).
NO_MAIN_TERM = {"ab", "fsp"}

# FSP needs equal channel counts position by position: resnet56 / resnet20 (16, 16, 32, 64) and
# resnet32x4 / resnet8x4 (32, 64, 128, 256); vgg13_bn / mobile_half is the mismatched pair.
FSP_PAIRS = [COMMITTED, "resnet32x4-resnet8x4"]
OFD_TRAIN_TEACHER = "resnet56train-resnet20"
# Teacher stage ends at twice the student's size: VID and FT pool the teacher, AB's connector
# upsamples the student (nearest x2 + conv3x3, kd_reference's 'upsample' regressor).
RESIZING_PAIR = "wrn_40_2-ShuffleV2"
RESIZING_METHODS = ["vid", "ab", "ft"]
# `--gamma 0`: the method's term without CE (for gradients and for a term that must fall in training).
GAMMA0 = ("--gamma", "0")


def fidelity_pairs(method: str) -> List[str]:
    return FSP_PAIRS if method == "fsp" else FIDELITY_PAIRS


def stage_names(method: str) -> List[str]:
    return ["init", "main"] if method in INIT_METHODS else ["main"]


@pytest.fixture(scope="module")
def joint(merge):
    """joint(pair_id, methods, *extra_args) -> Joint of the main graph, merged once per session."""
    return joint_factory(merge)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """artifacts(joint) -> its ORT Training artifact folder, generated once per stage graph."""
    return artifacts_factory(tmp_path_factory)


def stage_joint(joint, pair: str, method: str, stage: str, *extra: str) -> Joint:
    return joint(pair, method, *merge_args(method), *extra).stage(stage)


# --------------------------------------------------------------------------- the reference


class GraphParams:
    """Added parameters read from a graph's initializers as torch tensors of `dtype`.

    With grad=True the sidecar's requires_grad ones are autograd leaves, so that their
    gradients can be compared with ORT Training's (`leaves`, in the graph's layout via `to_graph`).
    """

    def __init__(self, j: Joint, dtype=torch.float64, grad: bool = False):
        self.j, self.dtype, self.grad = j, dtype, grad
        self.trainable = set(j.sidecar["requires_grad"])
        self.leaves: Dict[str, torch.Tensor] = {}
        self.transposed: Dict[str, bool] = {}

    def get(self, name: str, linear: bool = False) -> torch.Tensor:
        if name not in self.leaves:
            array = self.j.array(name)
            torch_layout = linear_weight(self.j, name) if linear else array
            self.transposed[name] = torch_layout.shape != array.shape or not np.array_equal(torch_layout, array)
            t = torch.from_numpy(np.array(torch_layout)).to(self.dtype)
            if self.grad and name in self.trainable:
                t.requires_grad_(True)
            self.leaves[name] = t
        return self.leaves[name]

    def to_graph(self, name: str, grad: np.ndarray) -> np.ndarray:
        return grad.T if self.transposed[name] else grad

    def trainable_leaves(self) -> Dict[str, torch.Tensor]:
        return {n: t for n, t in self.leaves.items() if t.requires_grad}

    def bn(self, prefix: str) -> dict:
        """BN params of `<prefix>.weight/.bias/.running_mean/.running_var`, epsilon from its node."""
        node = next((n for n in self.j.model.graph.node if n.op_type == "BatchNormalization" and n.input[1] == f"{prefix}.weight"), None)
        assert node is not None, f"{self.j.path.name}: no BatchNormalization reads `{prefix}.weight`"
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        return {
            "bn_gamma": self.get(f"{prefix}.weight"), "bn_beta": self.get(f"{prefix}.bias"),
            "bn_mean": self.get(f"{prefix}.running_mean"), "bn_var": self.get(f"{prefix}.running_var"), "bn_eps": eps,
        }

    def convs(self, prefix: str, count: int, with_bn: bool) -> List[dict]:
        """The `count` layers `<prefix>conv<i>.weight` (+ `.bias`, + `bn<i+1>` when with_bn), in order."""
        found = sorted(int(m.group(1)) for n in self.j.inits if (m := re.fullmatch(re.escape(prefix) + r"conv(\d+)\.weight", n)))
        assert len(found) == count, f"{self.j.path.name}: {count} conv layers expected under `{prefix}`, found {found}"
        layers = []
        for i in found:
            layer = {"weight": self.get(f"{prefix}conv{i}.weight")}
            if f"{prefix}conv{i}.bias" in self.j.inits:
                layer["bias"] = self.get(f"{prefix}conv{i}.bias")
            if with_bn:
                layer.update(self.bn(f"{prefix}bn{i + 1}"))
            layers.append(layer)
        return layers


def teacher_bn_feeding(pair: str, tensor: str) -> onnx.NodeProto:
    """The BatchNormalization of the teacher file that feeds its tap `tensor` (directly or via the residual Add)."""
    model = onnx.load(str(fixture_path(*PAIRS[pair][0])))
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer[tensor]
    if node.op_type == "BatchNormalization":
        return node
    assert node.op_type == "Add", f"teacher tap `{tensor}` is made by {node.op_type}, neither a BN nor a residual Add"
    bns = [producer[x] for x in node.input if x in producer and producer[x].op_type == "BatchNormalization"]
    assert len(bns) == 1, f"teacher tap `{tensor}`: {len(bns)} BatchNormalizations feed its Add"
    return bns[0]


def ofd_reference_margin(j: Joint, p: dict, t_pre: torch.Tensor) -> torch.Tensor:
    """METHODS.md 14: from the teacher BN feeding the tap (train-mode export), else from the batch."""
    if PAIRS[j.pair][0][1] == "train":
        bn = teacher_bn_feeding(j.pair, p["teacher"]["tensor"])
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fixture_path(*PAIRS[j.pair][0]))).graph.initializer}
        gamma, beta = (torch.from_numpy(np.array(inits[bn.input[k]])).double() for k in (1, 2))
        return R.ofd_margin(gamma, beta).to(t_pre.dtype)
    return R.ofd_margin_from_responses(t_pre)


def reference_terms(
    j: Joint,
    values: Dict[str, torch.Tensor],
    feeds: Dict[str, np.ndarray],
    bn_batch_stats: bool,
    dtype=torch.float64,
    params: Optional[GraphParams] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(every loss output of the stage graph `j` by kd_reference, CRD's state outputs by kd_reference).

    values: {graph tensor name: tensor} for every tap (teacher ones as `teacher/<name>`) and the
    student's outputs; feeds: the graph inputs (labels, CRD state); params: where added
    parameters come from (default: the graph's initial initializers, no autograd);
    bn_batch_stats: how the connectors' BNs normalise (False: running statistics, as an
    InferenceSession; True: batch statistics, as ORT Training).
    """
    hyper, method = j.sidecar["hyper"], j.methods[0]
    params = params or GraphParams(j, dtype)
    values = {k: v.to(dtype) for k, v in values.items()}
    pairs = j.pairs(method)
    assert pairs, f"{method}: the sidecar lists no pairs"
    # (student, teacher) tap values by pair; a side the graph does not compute (FT's init stage has
    # no student) is None.
    taps = [(values.get(p["student"]["tensor"]), values.get("teacher/" + p["teacher"]["tensor"])) for p in pairs]
    to = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)
    out, state = {}, {}

    if j.stage_name == "main":
        logits = values[j.student_outputs[0]]
        labels = torch.from_numpy(feeds["labels"])
        out["loss/ce"] = R.ce(logits, labels)
        if hyper["alpha"] > 0:
            out["loss/kd"] = R.kd(logits, values["teacher/" + j.student_outputs[0]], float(hyper["temperature"]))

    term = f"loss/{method}"
    if j.stage_name == "init":
        if method == "ab":
            connectors = [None if p["connector"] is None else params.convs(f"kd/ab/{p['stage']}/connector/", 1, True)[0] for p in pairs]
            out[term] = R.ab(taps, connectors, bn_batch_stats=bn_batch_stats)
        elif method == "fsp":
            out[term] = R.fsp([s for s, _ in taps], [t for _, t in taps])
        elif method == "ft":
            (_, t), = taps
            stage = pairs[0]["stage"]
            encoder = params.convs(f"kd/ft/{stage}/teacher_paraphraser/", 3, False)
            decoder = params.convs(f"kd/ft/{stage}/teacher_paraphraser_decoder/", 3, False)
            out[term] = R.ft_paraphraser_loss(t, encoder, decoder, decoder_as_conv=True)
        else:
            raise NotImplementedError(method)
    elif method == "vid":
        regressors = [[layer["weight"] for layer in params.convs(f"kd/vid/{p['stage']}/regressor/", 3, False)] for p in pairs]
        log_scales = [params.get(f"kd/vid/{p['stage']}/log_scale") for p in pairs]
        out[term] = R.vid(taps, regressors, log_scales)
    elif method == "ft":
        (s, t), = taps
        stage = pairs[0]["stage"]
        encoder = params.convs(f"kd/ft/{stage}/teacher_paraphraser/", 3, False)
        translator = params.convs(f"kd/ft/{stage}/translator/", 3, True)
        out[term] = R.ft(s, t, encoder, translator, bn_batch_stats=bn_batch_stats)
    elif method == "crd":
        (s, t), = taps
        prefix = f"kd/crd/{pairs[0]['stage']}/"
        embed_s = {"weight": params.get(prefix + "embed/linear0.weight", linear=True), "bias": params.get(prefix + "embed/linear0.bias")}
        embed_t = {"weight": params.get(prefix + "teacher_embed/linear0.weight", linear=True),
                   "bias": params.get(prefix + "teacher_embed/linear0.bias")}
        crd_hyper = hyper["crd"]
        loss, mem_s, mem_t, z = R.crd(
            s, t, embed_s, embed_t, to(feeds["kd/crd/memory_student"]), to(feeds["kd/crd/memory_teacher"]),
            torch.from_numpy(feeds["kd/crd/index"]), torch.from_numpy(feeds["kd/crd/contrast_index"]), to(feeds["kd/crd/z"]),
            N=crd_hyper["n_data"], K=crd_hyper["negatives"], tau=crd_hyper["temperature"], momentum=crd_hyper["momentum"],
        )
        out[term] = loss
        state = {"kd/crd/memory_student_next": mem_s, "kd/crd/memory_teacher_next": mem_t, "kd/crd/z_next": z}
    elif method == "ofd":
        connectors = [params.convs(f"kd/ofd/{p['stage']}/connector/", 1, True)[0] for p in pairs]
        margins = [ofd_reference_margin(j, p, t) for p, (_, t) in zip(pairs, taps)]
        out[term] = R.ofd(taps, connectors, margins, reduction="batch", bn_batch_stats=bn_batch_stats)
    elif method not in NO_MAIN_TERM:
        raise NotImplementedError(method)

    if j.stage_name == "init":
        out["loss"] = out[term]  # the init stage trains on its term alone, unweighted
    else:
        total = hyper["gamma"] * out["loss/ce"]
        if "loss/kd" in out:
            total = total + hyper["alpha"] * out["loss/kd"]
        if term in out:
            assert method in hyper["beta"], f"sidecar hyper.beta has no weight for {method}: {hyper['beta']}"
            total = total + hyper["beta"][method] * out[term]
        out["loss"] = total
    return out, state


def tap_names(j: Joint) -> List[str]:
    """The taps the reference may read that the graph computes: the method's pairs, the student's
    outputs and, when KD is on, the teacher's logits. (A graph keeps only what its loss reads: FT's
    init graph has no student, AB's and FSP's main graphs no teacher; an init stage's sidecar lists
    KD's logits pair too, which its graph lacks.)"""
    names = []
    for p in j.pairs(j.methods[0]):
        names += [p["student"]["tensor"], "teacher/" + p["teacher"]["tensor"]]
    names += j.student_outputs
    if j.stage_name == "main" and j.sidecar["hyper"]["alpha"] > 0:
        names.append("teacher/" + j.student_outputs[0])
    computed = {o for n in j.model.graph.node for o in n.output}
    return [n for n in dict.fromkeys(names) if n in computed]


def compare_state(got: Dict[str, np.ndarray], want: Dict[str, torch.Tensor], feeds: Dict[str, np.ndarray], what: str,
                  rtol: float = FID_RTOL, atol: float = 1e-6):
    """CRD's state outputs: memories (rows of the batch updated, every other row bit-identical) and Z."""
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w.detach().numpy(), rtol=rtol, atol=atol, err_msg=f"{what}: `{name}`")
    index = feeds["kd/crd/index"]
    others = np.setdiff1d(np.arange(len(feeds["kd/crd/memory_student"])), index)
    for side in ("student", "teacher"):
        before, after = feeds[f"kd/crd/memory_{side}"], got[f"kd/crd/memory_{side}_next"]
        assert np.array_equal(after[others], before[others]), f"{what}: rows of memory_{side} outside the batch changed"
        np.testing.assert_allclose(np.linalg.norm(after[index], axis=1), 1.0, rtol=1e-5,
                                   err_msg=f"{what}: updated rows of memory_{side} are not unit vectors")


# --------------------------------------------------------------------------- 1. graph contract


def expected_outputs(j: Joint) -> List[str]:
    """init: loss, loss/<method>; main: loss, loss/ce, [loss/kd], [loss/<method>], logits, [CRD state]."""
    method = j.methods[0]
    if j.stage_name == "init":
        return ["loss", f"loss/{method}"]
    names = ["loss", "loss/ce"] + (["loss/kd"] if j.sidecar["hyper"]["alpha"] > 0 else [])
    if method not in NO_MAIN_TERM:
        names.append(f"loss/{method}")
    names += [o.name for o in onnx.load(str(fixture_path(*PAIRS[j.pair][1]))).graph.output]
    return names + (CRD_STATE_OUTPUTS if method == "crd" else [])


def expected_inputs(j: Joint) -> List[Tuple[str, str]]:
    if j.stage_name == "init":
        return [("input", "float32")]
    names = [("input", "float32"), ("labels", "int64")]
    if "crd" in j.methods:
        names += [(n, "float32" if "memory" in n or n.endswith("/z") else "int64") for n in CRD_INPUTS]
    return names


def case_id(case) -> str:
    """pair-method-stage[-extra arguments] of a (pair, method, stage, extra) case."""
    pair, method, stage, extra = case
    return f"{pair}-{method}-{stage}" + ("".join(extra).replace("--", "-") if extra else "")


# Every graph of the committed pair; the pair with connectors everywhere (vgg13_bn -> mobile_half,
# FSP excepted: it refuses that pair); the resizing pair; KD in AB's main stage; OFD's teacher
# exported in train mode.
CONTRACT_CASES = (
    [(COMMITTED, m, s, ()) for m in METHODS for s in stage_names(m)]
    + [("vgg13_bn-mobile_half", m, s, ()) for m in METHODS if m != "fsp" for s in stage_names(m)]
    + [(RESIZING_PAIR, m, s, ()) for m in RESIZING_METHODS for s in stage_names(m)]
    + [
        (COMMITTED, "ab", "main", ("--alpha", "0.5")),
        (COMMITTED, "ofd", "main", ("--teacher-batch-statistics",)),
        (OFD_TRAIN_TEACHER, "ofd", "main", ()),
        (OFD_TRAIN_TEACHER, "ofd", "main", ("--teacher-batch-statistics",)),
    ]
)


@pytest.mark.parametrize("pair, method, stage, extra", CONTRACT_CASES, ids=[case_id(c) for c in CONTRACT_CASES])
def test_graph_contract(joint, pair, method, stage, extra, kdgraph_version):
    """merge_checks.check_graph_contract, then the stages, parameters and specifics of each method."""
    j = stage_joint(joint, pair, method, stage, *extra)
    reads_teacher = not (stage == "main" and method in NO_MAIN_TERM and j.sidecar["hyper"]["alpha"] == 0)
    check_graph_contract(j, kdgraph_version, expected_outputs(j), expected_inputs(j), needs_teacher=reads_teacher)
    sc, inits, where = j.sidecar, j.inits, case_id((pair, method, stage, extra))
    assert sc["stage"] == stage, f"{where}: sidecar stage {sc['stage']!r}"

    # The stages, the same list in every sidecar of the merge.
    main = j.stage("main")
    stages = sc["stages"]
    if method in INIT_METHODS:
        init = j.stage("init")
        assert [(s["name"], s["model"], s["sidecar"], s["carry_from"]) for s in stages] == [
            ("init", init.path.name, init.path.with_suffix(".json").name, None),
            ("main", main.path.name, main.path.with_suffix(".json").name, "init"),
        ], f"{where}: stages {stages}"
        assert stages[0]["epochs"] == 30, f"{where}: init epochs {stages[0]['epochs']}, RepDistiller's 30"
        assert init.sidecar["stages"] == main.sidecar["stages"], f"{where}: the two sidecars list different stages"
        assert init.path.name == main.path.name.replace(".onnx", ".init.onnx")
    else:
        assert [(s["name"], s["model"], s["carry_from"]) for s in stages] == [("main", main.path.name, None)], f"{where}: stages {stages}"
        assert not main.path.with_name(main.path.stem + ".init.onnx").exists(), f"{where}: an init graph was written"

    req = set(sc["requires_grad"])
    node_names = [n.name for n in j.model.graph.node]
    student = onnx.load(str(fixture_path(*PAIRS[j.pair][1])))
    student_params = {i.name for i in student.graph.initializer}

    # Every added weight, bias and log_scale trains (FT's paraphraser encoder in the main stage excepted:
    # a constant there), and no added tensor trains that is not one of them.
    added = re.compile(r"kd/.+/((conv|bn|linear)\d+\.(weight|bias)|log_scale)")
    learnable = {n for n in inits if added.fullmatch(n) and not (stage == "main" and "/teacher_paraphraser/" in n)}
    assert learnable <= req, f"{where}: added parameters not in requires_grad: {sorted(learnable - req)[:5]}"
    assert {n for n in req if n.startswith("kd/")} <= learnable, f"{where}: unexpected trainables {sorted(req - learnable - student_params)}"
    if "--teacher-batch-statistics" in extra:
        assert sc["hyper"]["teacher_batch_statistics"] is True
        teacher_file_bns = [n for n in onnx.load(str(fixture_path(*PAIRS[pair][0]))).graph.node if n.op_type == "BatchNormalization"]
        kept = [n for n in j.model.graph.node if n.op_type == "BatchNormalization" and n.name.startswith("teacher/")]
        assert bool(kept) == bool(teacher_file_bns), f"{where}: {len(kept)} teacher BNs kept of the file's {len(teacher_file_bns)}"
    else:
        assert sc["hyper"].get("teacher_batch_statistics") is False, f"{where}: hyper {sc['hyper']}"
    if stage == "init":
        assert "labels" not in j.input_names
        # Only what reaches the init term: never the student's classifier.
        classifier = {n.input[1] for n in student.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in student_params}
        assert not req & classifier, f"{where}: the classifier {sorted(req & classifier)} is trained in the init stage"
        if method == "ft":
            stage_name = j.pairs("ft")[0]["stage"]
            want = {f"kd/ft/{stage_name}/{part}/conv{i}.{k}" for part in ("teacher_paraphraser", "teacher_paraphraser_decoder")
                    for i in (0, 2, 4) for k in ("weight", "bias")}
            assert req == want, f"{where}: requires_grad {sorted(req)}, expected the paraphraser and its decoder {sorted(want)}"
            decoder = [n for n in j.model.graph.node if any(x.startswith(f"kd/ft/{stage_name}/teacher_paraphraser_decoder/") for x in n.input)
                       and n.op_type in ("Conv", "ConvTranspose")]
            assert len(decoder) == 3 and all(n.op_type == "Conv" for n in decoder), f"{where}: decoder ops {[n.op_type for n in decoder]}"
            for n in decoder:
                attrs = {a.name: list(a.ints) for a in n.attribute}
                assert attrs.get("strides", [1, 1]) == [1, 1] and attrs.get("pads") == [1, 1, 1, 1], f"{where}: decoder conv `{n.name}` {attrs}"
        else:
            student_req = req & student_params
            assert student_req, f"{where}: no student parameter is trained in the init stage"
            assert first_student_conv_weight(j) in req
            extra_req = req - student_params
            if method == "fsp":
                assert not extra_req, f"{where}: FSP trains no added parameter, requires_grad has {sorted(extra_req)}"
            assert all(n.startswith(f"kd/{method}/") and "/connector/" in n for n in extra_req), f"{where}: added trainables {sorted(extra_req)}"
            if method == "ab":
                for p in j.pairs("ab"):
                    has = any(n.startswith(f"kd/ab/{p['stage']}/connector/") for n in inits)
                    identity = p["teacher"]["shape"][1:] == p["student"]["shape"][1:]
                    assert has != identity, f"{where}: {p['stage']} connector {'present' if has else 'missing'} for {p['teacher']['shape']} / {p['student']['shape']}"
    else:
        if method in NO_MAIN_TERM:
            assert not [n for n in node_names if n.startswith(f"kd/{method}/")], f"{where}: the main graph computes the {method} term"
            assert not [n for n in inits if n.startswith(f"kd/{method}/")], f"{where}: {method} initializers in the main graph"
        if method == "ft":
            init = j.stage("init")
            stage_name = j.pairs("ft")[0]["stage"]
            encoder = [n for n in init.sidecar["requires_grad"] if "/teacher_paraphraser/" in n]
            for name in encoder:
                assert name in inits, f"{where}: the paraphraser encoder `{name}` is missing from the main graph"
                assert name not in req and name not in sc["frozen_params"], f"{where}: `{name}` is a parameter of the main stage, not a constant"
                assert np.array_equal(j.array(name), init.array(name)), f"{where}: `{name}` differs between the init and main graphs"
            assert not [n for n in inits if "/teacher_paraphraser_decoder/" in n], f"{where}: the decoder is in the main graph"
            assert any(n.startswith(f"kd/ft/{stage_name}/translator/") for n in req), f"{where}: no translator parameter trains"
        if method == "vid":
            for p in j.pairs("vid"):
                t_c, s_c = p["teacher"]["shape"][1], p["student"]["shape"][1]
                log_scale = f"kd/vid/{p['stage']}/log_scale"
                assert log_scale in req, f"{where}: `{log_scale}` is not trainable"
                np.testing.assert_allclose(j.array(log_scale), np.full(t_c, R.VID_INIT_LOG_SCALE, np.float32), rtol=1e-6,
                                           err_msg=f"{where}: `{log_scale}` is not log(exp(5 - 1e-5) - 1)")
                weights = [f"kd/vid/{p['stage']}/regressor/conv{i}.weight" for i in (0, 2, 4)]
                shapes = [list(j.inits[w].dims) for w in weights]
                assert shapes == [[t_c, s_c, 1, 1], [t_c, t_c, 1, 1], [t_c, t_c, 1, 1]], f"{where}: regressor shapes {shapes}"
                convs = [n for n in j.model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
                assert len(convs) == 3 and all(len(n.input) == 2 for n in convs), f"{where}: regressor convs with bias"
                assert all(w in req for w in weights)
        if method == "crd":
            specs = {i["name"]: i for i in sc["inputs"]}
            assert specs["kd/crd/contrast_index"]["shape"][1:] == [CRD_K + 1], f"{where}: {specs['kd/crd/contrast_index']}"
            for side in ("student", "teacher"):
                assert specs[f"kd/crd/memory_{side}"]["shape"] == [CRD_N, 128], f"{where}: {specs[f'kd/crd/memory_{side}']}"
            assert specs["kd/crd/z"]["shape"] == [2]
            roles = {o["name"]: o["role"] for o in sc["outputs"]}
            assert all(roles[n] == "state" for n in CRD_STATE_OUTPUTS), f"{where}: output roles {roles}"
            assert all(specs[n]["role"] == "state" for n in CRD_INPUTS), f"{where}: input roles {specs}"
            want = {"n_data": CRD_N, "negatives": CRD_K, "feat_dim": 128, "temperature": 0.07, "momentum": 0.5}
            assert {k: sc["hyper"]["crd"].get(k) for k in want} == want, f"{where}: hyper {sc['hyper']['crd']}"
            for side in ("embed", "teacher_embed"):
                for k in ("weight", "bias"):
                    assert f"kd/crd/embedding/{side}/linear0.{k}" in req, f"{where}: `kd/crd/embedding/{side}/linear0.{k}` not trainable"
        if method == "ofd":
            assert sc["hyper"]["beta"]["ofd"] == pytest.approx(1e-3), f"{where}: beta {sc['hyper']['beta']}"
            for p in j.pairs("ofd"):
                t_c = p["teacher"]["shape"][1]
                prefix = f"kd/ofd/{p['stage']}/connector/"
                assert f"{prefix}conv0.bias" not in inits, f"{where}: the OFD connector conv has a bias"
                w = j.array(f"{prefix}conv0.weight")
                assert w.shape[:2] == (t_c, p["student"]["shape"][1]) and w.shape[2:] == (1, 1), f"{where}: connector {w.shape}"
                assert np.array_equal(j.array(f"{prefix}bn1.weight"), np.ones(t_c, np.float32))
                assert np.array_equal(j.array(f"{prefix}bn1.bias"), np.zeros(t_c, np.float32))
            for p in j.pairs("ofd"):
                note = ofd_note(j, p["stage"])
                if PAIRS[pair][0][1] == "eval":
                    assert "mean negative response" in note, f"{where}: an eval-mode teacher's note must say the margins are estimated: {note!r}"
                else:
                    bn = teacher_bn_feeding(pair, p["teacher"]["tensor"])
                    assert f"`{bn.name}`" in note, f"{where}: the note {note!r} does not name the teacher BN `{bn.name}`"


def ofd_note(j: Joint, stage: str) -> str:
    """The sidecar note that says where OFD's margins of `stage` come from."""
    notes = [n for n in j.sidecar["notes"] if n.startswith(f"ofd {stage}:")]
    assert len(notes) == 1, f"{j.path.name}: {len(notes)} notes on the margins of ofd {stage}: {j.sidecar['notes']}"
    return notes[0]


@pytest.mark.parametrize("pair", [COMMITTED, "vgg13_bn-mobile_half"])
def test_ofd_connector_initialisation(joint, pair):
    """conv1x1 weights ~ N(0, 2/t_C) (pooled over all stages: the sample variance within 10%)."""
    j = joint(pair, "ofd")
    ratios, count = 0.0, 0
    for p in j.pairs("ofd"):
        w = j.array(f"kd/ofd/{p['stage']}/connector/conv0.weight").astype(np.float64)
        t_c = p["teacher"]["shape"][1]
        assert abs(w.mean()) < 4 * np.sqrt(2.0 / t_c / w.size), f"{p['stage']}: mean {w.mean():.3g}"
        stage_ratio = float((w ** 2).mean() / (2.0 / t_c))
        assert 0.6 < stage_ratio < 1.4, f"{pair} {p['stage']}: weight variance {(w ** 2).mean():.4g}, 2/t_C = {2.0 / t_c:.4g}"
        ratios += stage_ratio * w.size
        count += w.size
    assert abs(ratios / count - 1) < 0.1, f"{pair}: pooled variance ratio to 2/t_C is {ratios / count:.4f}"


def test_fsp_mismatched_channels_is_a_clear_error(kdgraph_bin, tmp_path):
    """vgg13_bn (stem 64 channels) -> mobile_half (stem 16): exit 1, naming both tensors, no file written."""
    teacher, student = (fixture_path(*m) for m in PAIRS["vgg13_bn-mobile_half"])

    def stem(model):
        out = subprocess.run([str(kdgraph_bin), "inspect", str(model), "--json"], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout)["stages"][0]["tensor"]

    out = tmp_path / "joint.onnx"
    result = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "--method", "fsp", "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    message = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode}:\n{message}"
    for name in (stem(teacher), stem(student)):
        assert f"`{name}`" in message, f"the error does not name `{name}`:\n{message}"
    assert "panic" not in message.lower(), message
    assert not list(tmp_path.iterdir()), f"files written: {list(tmp_path.iterdir())}"


def test_crd_needs_the_dataset_size(kdgraph_bin, tmp_path):
    """CRD's memories need N: without --crd-n-data, a usage error that names the option, no file written."""
    teacher, student = (fixture_path(*m) for m in PAIRS[COMMITTED])
    result = subprocess.run([str(kdgraph_bin), "merge", str(teacher), str(student), "--method", "crd", "-o", str(tmp_path / "joint.onnx")],
                            capture_output=True, text=True, timeout=300)
    message = result.stdout + result.stderr
    # A missing option is the caller's to fix: a usage error, exit 2 (src/error.rs), not 1 (a model
    # that cannot be used).
    assert result.returncode == 2, f"exit {result.returncode}, a usage error exits with 2:\n{message}"
    assert "--crd-n-data" in message and "panic" not in message.lower(), message
    assert not list(tmp_path.iterdir()), f"files written: {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("extra", [(), ("--teacher-batch-statistics",)], ids=["folded", "batch-statistics"])
def test_ofd_margins_of_a_train_mode_teacher(joint, extra):
    """A teacher exported in train mode keeps its BNs: margins = ofd_margin(gamma, beta) of the BN feeding each tap."""
    j = joint(OFD_TRAIN_TEACHER, "ofd", *extra)
    pairs = j.pairs("ofd")
    for p in pairs:
        bn = teacher_bn_feeding(j.pair, p["teacher"]["tensor"])
        note = ofd_note(j, p["stage"])
        assert f"`{bn.name}`" in note, f"{p['stage']}: the note {note!r} does not name the BN `{bn.name}`"
    got = margins_in_graph(j, graph_feeds(j, FIDELITY_BATCH))
    for p in pairs:
        want = ofd_reference_margin(j, p, torch.zeros(1, dtype=torch.float64)).numpy()
        name, value = got[p["stage"]]
        assert name in j.inits, f"OFD {p['stage']}: the margins `{name}` are computed in the graph, not taken from the teacher BN"
        g = value.reshape(-1)
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7, err_msg=f"OFD {p['stage']} margins vs ofd_margin of the teacher BN")


def test_ofd_margins_of_an_eval_mode_teacher(joint):
    """A folded teacher: margins = the batch's mean negative response per channel (ofd_margin_from_responses)."""
    j = joint(COMMITTED, "ofd")
    feeds = graph_feeds(j, FIDELITY_BATCH)
    got = margins_in_graph(j, feeds)
    taps = run_with_taps(j.model, j.tap_names(), feeds)
    for p in j.pairs("ofd"):
        name, value = got[p["stage"]]
        assert name not in j.inits, f"OFD {p['stage']}: the margins are a constant `{name}` of an eval-mode (folded) teacher"
        t = torch.from_numpy(taps["teacher/" + p["teacher"]["tensor"]]).double()
        want = R.ofd_margin_from_responses(t).numpy()
        np.testing.assert_allclose(value.reshape(-1), want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"OFD {p['stage']}: in-graph margins vs the batch's mean negative response")


def margins_in_graph(j: Joint, feeds) -> Dict[str, Tuple[str, np.ndarray]]:
    """{stage: (name, value) of the margin tensor that OFD's Max clips the teacher tap with} on `feeds`."""
    clip = {}
    for p in j.pairs("ofd"):
        tap = "teacher/" + p["teacher"]["tensor"]
        maxes = [n for n in j.model.graph.node if n.op_type == "Max" and tap in n.input and n.name.startswith(f"kd/ofd/{p['stage']}/")]
        assert len(maxes) == 1, f"OFD {p['stage']}: {len(maxes)} Max nodes clip `{tap}`"
        (other,) = [x for x in maxes[0].input if x != tap]
        clip[p["stage"]] = other
    constant = {s: n for s, n in clip.items() if n in j.inits}
    got = run_with_taps(j.model, [n for n in clip.values() if n not in j.inits], feeds)
    return {s: (n, j.array(n) if s in constant else got[n]) for s, n in clip.items()}


# --------------------------------------------------------------------------- 2. fidelity


FIDELITY_CASES = [(pair, m, s, ()) for m in METHODS for pair in fidelity_pairs(m) for s in stage_names(m)] + [
    (RESIZING_PAIR, m, s, ()) for m in RESIZING_METHODS for s in stage_names(m)
] + [
    (COMMITTED, "ab", "main", ("--alpha", "0.5")),
    (OFD_TRAIN_TEACHER, "ofd", "main", ()),
    (OFD_TRAIN_TEACHER, "ofd", "main", ("--teacher-batch-statistics",)),
]


@pytest.mark.parametrize("pair, method, stage, extra", FIDELITY_CASES, ids=[case_id(c) for c in FIDELITY_CASES])
def test_fidelity(joint, pair, method, stage, extra):
    """Every loss output of an InferenceSession equals kd_reference on the graph's own taps (CRD: with Z
    estimated from the batch, then given)."""
    j = stage_joint(joint, pair, method, stage, *extra)
    feeds = graph_feeds(j, FIDELITY_BATCH)
    z_cases = [(-1.0, -1.0), (50.0, 70.0)] if method == "crd" else [None]
    for z in z_cases:
        if z is not None:
            feeds["kd/crd/z"] = np.asarray(z, np.float32)
        what = f"{pair} {method} {stage}{' ' + ' '.join(extra) if extra else ''}, batch {FIDELITY_BATCH}" + (f", Z {z}" if z else "")
        got = run_with_taps(j.model, tap_names(j), feeds)
        values = {name: torch.from_numpy(got[name]).double() for name in tap_names(j)}
        want, state = reference_terms(j, values, feeds, bn_batch_stats=False)
        want32, _ = reference_terms(j, values, feeds, bn_batch_stats=False, dtype=torch.float32)
        compare_terms(j, got, want, FID_RTOL, 0.0, what, want32, float64_terms(j, {**feeds, **{n: got[n] for n in tap_names(j)}}))
        if state:
            compare_state(got, state, feeds, what)
            if z[0] > 0:
                assert np.array_equal(got["kd/crd/z_next"], feeds["kd/crd/z"]), f"{what}: a given Z is not passed through"


SYNTHETIC_BATCH = 5


SYNTHETIC_CASES = [(p, m, s) for m in METHODS for p in dict.fromkeys([COMMITTED] + fidelity_pairs(m)) for s in stage_names(m)] + [
    (RESIZING_PAIR, m, s) for m in RESIZING_METHODS for s in stage_names(m)
]


@pytest.mark.parametrize("pair, method, stage", SYNTHETIC_CASES, ids=[f"{p}-{m}-{s}" for p, m, s in SYNTHETIC_CASES])
def test_loss_terms_on_synthetic_taps(joint, pair, method, stage):
    """The loss subgraph alone, fed signed random taps: every term is well conditioned and must match."""
    j = stage_joint(joint, pair, method, stage)
    rng = np.random.RandomState(7)
    shapes = {}
    for p in j.sidecar["pairs"]:
        shapes[p["student"]["tensor"]] = p["student"]["shape"]
        shapes["teacher/" + p["teacher"]["tensor"]] = p["teacher"]["shape"]
    for name in j.student_outputs:
        shapes.setdefault(name, ["N", mf.NUM_CLASSES])
    feeds = graph_feeds(j, SYNTHETIC_BATCH, images=np.zeros((SYNTHETIC_BATCH, *mf.INPUT_SHAPE), np.float32))
    for name, shape in shapes.items():
        dims = [SYNTHETIC_BATCH if isinstance(d, str) else int(d) for d in shape]
        scale = 3.0 if name in j.student_outputs else 1.0
        feeds[name] = (scale * rng.standard_normal(dims)).astype(np.float32)
    model = loss_subgraph(j, list(feeds))
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    used = {i.name for i in session.get_inputs()}
    got = dict(zip(j.loss_names, session.run(j.loss_names, {k: v for k, v in feeds.items() if k in used})))
    values = {k: torch.from_numpy(feeds[k]).double() for k in shapes}
    want, _ = reference_terms(j, values, feeds, bn_batch_stats=False)
    compare_terms(j, got, want, FID_RTOL, 0.0, f"{pair} {method} {stage} on synthetic taps, batch {SYNTHETIC_BATCH}")


# --------------------------------------------------------------------------- 3. ORT Training


# Every stage graph as merged; and the main graphs that hold a term of their method with
# `--gamma 0`, where that term must fall (an init stage's loss is its term alone). Such a main
# graph as merged runs under KDGRAPH_HEAVY=1 only: its --gamma 0 case checks more.
TRAIN_CASES = [(COMMITTED, m, s, ()) for m in METHODS for s in stage_names(m)] + [
    (COMMITTED, m, "main", GAMMA0) for m in METHODS if m not in NO_MAIN_TERM
]
TRAIN_PARAMS = cases(TRAIN_CASES, lambda c: c[2] != "main" or c[3] or c[1] in NO_MAIN_TERM, case_id)


def watched_parameter(j: Joint) -> str:
    """The parameter whose change proves training: the first student conv, else the first trainable one."""
    conv = next((n.input[1] for n in j.model.graph.node if n.op_type == "Conv" and not n.name.startswith(("teacher/", "kd/"))), None)
    return conv if conv in j.sidecar["requires_grad"] else j.sidecar["requires_grad"][0]


@pytest.mark.parametrize("pair, method, stage, extra", TRAIN_PARAMS)
def test_ort_training(joint, artifacts, pair, method, stage, extra, tmp_path):
    """Loss falls in TRAIN_STEPS steps (CRD: memories and Z fed back), and so does the method's own term where it
    is the whole loss (init stages, --gamma 0); the teacher stays bit-identical, the exported student
    matches the eval-mode module (graphs with student outputs)."""
    j = stage_joint(joint, pair, method, stage, *extra)
    term = f"loss/{method}" if stage == "init" or extra == GAMMA0 else None
    check_ort_training(j, artifacts(j), graph_feeds(j, TRAIN_BATCH), tmp_path, watched_parameter(j), term)


def test_ort_training_teacher_batch_statistics(joint, artifacts, tmp_path):
    """OFD with the teacher's BNs kept (--teacher-batch-statistics, as the reference): it trains, the teacher
    file's tensors stay bit-identical."""
    j = joint(OFD_TRAIN_TEACHER, "ofd", "--teacher-batch-statistics")
    check_ort_training(j, artifacts(j), graph_feeds(j, TRAIN_BATCH), tmp_path, watched_parameter(j))


# --------------------------------------------------------------------------- 4. gradients


GRAD_CASES = (
    [(COMMITTED, m, "main", w) for m in ["vid", "ft", "crd", "ofd"] for w in ((), GAMMA0)]
    + [(COMMITTED, m, "init", ()) for m in ["ab", "fsp", "ft"]]
    + [
        ("resnet56-resnet8x4", "ab", "init", ()),  # AB's conv + BN connectors (batch statistics)
        (OFD_TRAIN_TEACHER, "ofd", "main", GAMMA0),  # margins from the teacher's BNs, folded teacher
        (OFD_TRAIN_TEACHER, "ofd", "main", ("--teacher-batch-statistics",) + GAMMA0),  # teacher on batch statistics
    ]
)


@pytest.mark.parametrize("pair, method, stage, extra", GRAD_CASES, ids=[case_id(c) for c in GRAD_CASES])
def test_gradient_matches_torch(joint, artifacts, pair, method, stage, extra):
    """ORT Training's gradients of the first student conv weight and of every added trainable parameter
    vs torch autograd through the PyTorch models and kd_reference (CRD: Z estimated from the batch,
    detached as METHODS.md says; the test also shows that an attached Z would be told apart).
    `--gamma 0` leaves the method's own term alone (CE would otherwise dominate the gradient)."""
    j = stage_joint(joint, pair, method, stage, *extra)
    seed = 3
    feeds = graph_feeds(j, TRAIN_BATCH, seed)
    x = feeds["input"]
    y = feeds.get("labels", label_batch(TRAIN_BATCH, seed))

    check_taps_match_torch(j, x, y, seed, {k: v for k, v in feeds.items() if k.startswith("kd/")})
    session = new_stage(j, artifacts(j))
    outputs = session.forward_backward(feeds)

    values, student = torch_taps(j, x, seed, train=True)
    params = GraphParams(j, torch.float64, grad=True)
    terms, state = reference_terms(j, values, feeds, bn_batch_stats=True, params=params)
    detached = {k: v.detach() for k, v in values.items()}
    terms32, _ = reference_terms(j, detached, feeds, bn_batch_stats=True, dtype=torch.float32)
    what = case_id((pair, method, stage, extra))
    compare_terms(j, outputs, {k: v.detach() for k, v in terms.items()}, 1e-3, 1e-7, f"{what}: training forward vs torch", terms32)
    if state:
        z = state["kd/crd/z_next"].detach().numpy()
        np.testing.assert_allclose(outputs["kd/crd/z_next"], z, rtol=1e-3, err_msg=f"{what}: Z estimated in training vs torch")

    wanted: Dict[str, torch.Tensor] = dict(params.trainable_leaves())
    conv = first_student_conv_weight(j) if j.stage_name == "main" or method != "ft" else None
    if conv is not None:
        torch_params = dict(student.named_parameters())
        assert conv in torch_params, f"`{conv}` is not a parameter of the torch student ({list(torch_params)[:5]}...)"
        wanted[conv] = torch_params[conv]
    assert wanted, f"{what}: nothing to compare"
    grads = torch.autograd.grad(terms["loss"], list(wanted.values()), allow_unused=True)
    want = {n: (np.zeros(tuple(t.shape)) if g is None else g.numpy()) for (n, t), g in zip(wanted.items(), grads)}
    want = {n: (params.to_graph(n, g) if n in params.leaves else g) for n, g in want.items()}
    scale = max(np.linalg.norm(g) for g in want.values())
    failures = []
    for name, w in want.items():
        got = session.gradient(name)
        assert got is not None, f"{what}: no ORT gradient for `{name}`"
        if np.linalg.norm(w) <= 1e-7 * scale:  # e.g. a conv bias before a batch-statistics BN: 0 in exact arithmetic
            if np.linalg.norm(got) > 1e-5 * scale:
                failures.append(f"`{name}`: |ort| {np.linalg.norm(got):.3g}, torch ~0 (scale {scale:.3g})")
            continue
        rel = relative_error(got, w)
        if not rel < GRAD_RTOL:
            failures.append(f"`{name}`: rel err {rel:.3g} (|ort| {np.linalg.norm(got):.6g}, |torch| {np.linalg.norm(w):.6g})")
    assert not failures, f"{what}: gradients vs torch autograd (rtol {GRAD_RTOL}):\n  " + "\n  ".join(failures)

    if method == "crd" and extra == GAMMA0:
        # The test's power: with Z attached to the graph, the gradients of the student embedding differ.
        name = "kd/crd/embedding/embed/linear0.weight"
        attached = crd_loss_z_attached(j, detached, feeds, params)
        (g_attached,) = torch.autograd.grad(attached, [params.leaves[name]])
        rel = relative_error(params.to_graph(name, g_attached.numpy()), want[name])
        assert rel > 10 * GRAD_RTOL, f"an attached Z changes `{name}`'s gradient by only {rel:.3g}: the test cannot tell"


def crd_loss_z_attached(j: Joint, values, feeds, params: GraphParams) -> torch.Tensor:
    """beta * CRD with Z = mean(out) * N left attached to the graph (what METHODS.md rules out)."""
    (p,) = j.pairs("crd")
    hyper = j.sidecar["hyper"]["crd"]
    n, tau = hyper["n_data"], hyper["temperature"]
    prefix = f"kd/crd/{p['stage']}/"
    e_s = R.crd_embed(values[p["student"]["tensor"]], {"weight": params.leaves[prefix + "embed/linear0.weight"],
                                                       "bias": params.leaves[prefix + "embed/linear0.bias"]})
    e_t = R.crd_embed(values["teacher/" + p["teacher"]["tensor"]], {"weight": params.leaves[prefix + "teacher_embed/linear0.weight"],
                                                                    "bias": params.leaves[prefix + "teacher_embed/linear0.bias"]})
    index = torch.from_numpy(feeds["kd/crd/contrast_index"])
    mem_s = torch.from_numpy(feeds["kd/crd/memory_student"]).double()[index]
    mem_t = torch.from_numpy(feeds["kd/crd/memory_teacher"]).double()[index]
    out_t = torch.exp(torch.bmm(mem_s, e_t.unsqueeze(2)).squeeze(2) / tau)
    out_s = torch.exp(torch.bmm(mem_t, e_s.unsqueeze(2)).squeeze(2) / tau)
    loss = R.crd_contrast_loss(out_s / (out_s.mean() * n), n) + R.crd_contrast_loss(out_t / (out_t.mean() * n), n)
    return j.sidecar["hyper"]["beta"]["crd"] * loss


# --------------------------------------------------------------------------- 5. degenerate batches


DEGENERATE_CASES = [(m, s) for m in METHODS for s in stage_names(m)]


@pytest.mark.parametrize("method, stage", DEGENERATE_CASES, ids=[f"{m}-{s}" for m, s in DEGENERATE_CASES])
@pytest.mark.parametrize("kind", ["zero-images", "batch-1"])
def test_degenerate_batches(joint, artifacts, method, stage, kind):
    """All-zero images (batch 4) and a batch of one: finite loss terms in an InferenceSession (and CRD
    state), finite gradients and parameters after a step in ORT Training."""
    j = stage_joint(joint, COMMITTED, method, stage)
    if kind == "zero-images":
        feeds = graph_feeds(j, FIDELITY_BATCH, images=np.zeros((FIDELITY_BATCH, *mf.INPUT_SHAPE), np.float32))
    else:
        feeds = graph_feeds(j, 1)
    what = f"{method} {stage} {kind}"
    got = run_with_taps(j.model, [], feeds)
    bad = {n: float(got[n]) for n in j.loss_names if not np.isfinite(got[n])}
    assert not bad, f"{what}: non-finite {bad}"
    bad = [n for n in CRD_STATE_OUTPUTS if n in got and not np.all(np.isfinite(got[n]))]
    assert not bad, f"{what}: non-finite state outputs {bad}"
    assert_finite_step(new_stage(j, artifacts(j)), feeds, what)


# --------------------------------------------------------------------------- 6. the example


def quiet(*args, **kwargs):
    pass


def copy_merge(j: Joint, to: Path) -> Path:
    """The merge's graphs and sidecars copied into `to`; the main sidecar's new path."""
    to.mkdir(parents=True, exist_ok=True)
    for spec in j.sidecar["stages"]:
        for key in ("model", "sidecar"):
            shutil.copy(j.path.parent / spec[key], to / spec[key])
    return to / j.path.with_suffix(".json").name


@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_example_trains_init_then_main(joint, method, tmp_path):
    """train_ort.train: the init stage, then the main stage started from the init-trained parameters."""
    j = joint(COMMITTED, method)
    sidecar = copy_merge(j, tmp_path / "merge")
    workdir = tmp_path / "work"
    result = train_ort.train(sidecar, steps=2, init_steps=4, batch=TRAIN_BATCH, workdir=workdir, log=quiet)

    assert list(result.histories) == ["init", "main"], f"{method}: stages trained {list(result.histories)}"
    assert len(result.histories["init"]) == 4 and len(result.histories["main"]) == 2
    init_terms = [float(r.outputs[f"loss/{method}"]) for r in result.histories["init"]]
    assert np.all(np.isfinite(init_terms)), f"{method} init: {init_terms}"
    assert all("loss/ce" in r.outputs for r in result.histories["main"]) and all("loss/ce" not in r.outputs for r in result.histories["init"])

    trained = result.stages["init"].parameters()
    initial = {i.name: numpy_helper.to_array(i) for i in j.stage("init").model.graph.initializer}
    if method == "ft":
        # The paraphraser encoder: trained in the init stage, a constant of the main graph that
        # the example overwrote by name before generating the main artifacts.
        encoder = [n for n in trained if "/teacher_paraphraser/" in n]
        assert len(encoder) == 6, f"init-stage parameters {sorted(trained)}"
        main_model = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(workdir / "main" / "training_model.onnx")).graph.initializer}
        main_state = {n for n, _ in result.stages["main"].state.parameters}
        for name in encoder:
            assert not np.array_equal(trained[name], initial[name]), f"`{name}` did not change in the init stage"
            assert name in main_model, f"`{name}` is not an initializer of the main training model"
            assert np.array_equal(main_model[name], trained[name]), f"`{name}`: the main graph's constant is not the init-trained value"
            assert name not in main_state, f"`{name}` is a parameter of the main stage"
    else:
        # The student: the main stage's checkpoint starts from the init-trained values (BN running
        # statistics included).
        start = {n: np.array(p.data) for n, p in train_ort.CheckpointState.load_checkpoint(str(workdir / "main" / "checkpoint")).parameters}
        shared = sorted(set(trained) & set(start))
        conv = first_student_conv_weight(j)
        assert conv in shared, f"`{conv}` is not carried ({shared[:5]}...)"
        assert not np.array_equal(trained[conv], initial[conv]), f"`{conv}` did not change in the init stage"
        differ = [n for n in shared if not np.array_equal(start[n], trained[n])]
        assert not differ, f"{method}: the main stage does not start from the init-trained {differ[:5]}"

    exported = onnx.load(str(result.student))
    assert [i.name for i in exported.graph.input] == ["input"] and [o.name for o in exported.graph.output] == j.student_outputs
    assert result.student == sidecar.with_suffix(".student.onnx")


def test_example_feeds_crd_memories_back(joint, tmp_path):
    """train_ort.train on CRD: each step's memories are the last step's outputs; only the batch's rows
    change (to unit vectors); Z is estimated at the first step and then stays fixed."""
    j = joint(COMMITTED, "crd", *CRD_ARGS)
    sidecar = copy_merge(j, tmp_path / "merge")
    result = train_ort.train(sidecar, steps=4, batch=TRAIN_BATCH, workdir=tmp_path / "work", log=quiet)
    history = result.histories["main"]
    memory = train_ort.crd_state(j.sidecar["hyper"]["crd"])
    z_first = history[0].outputs["kd/crd/z_next"]
    assert np.all(z_first > 0), f"Z after the first step: {z_first}"
    updated = set()
    for k, record in enumerate(history):
        out, index = record.outputs, record.index
        others = np.setdiff1d(np.arange(CRD_N), index)
        for side in ("student", "teacher"):
            before, after = memory[f"kd/crd/memory_{side}"], out[f"kd/crd/memory_{side}_next"]
            assert np.array_equal(after[others], before[others]), f"step {k}: rows of memory_{side} outside the batch changed"
            assert not np.any(np.all(after[index] == before[index], axis=1)), f"step {k}: a batch row of memory_{side} did not change"
            np.testing.assert_allclose(np.linalg.norm(after[index], axis=1), 1.0, rtol=1e-5)
            memory[f"kd/crd/memory_{side}"] = after
        updated.update(index.tolist())
        assert np.array_equal(out["kd/crd/z_next"], z_first), f"step {k}: Z {out['kd/crd/z_next']} changed from {z_first}"
        assert np.isfinite(float(out["loss"]))
    # Rows updated in earlier steps and not in the last batch kept their updated values: the
    # memory fed to each step was the previous step's output, not the initial one.
    initial = train_ort.crd_state(j.sidecar["hyper"]["crd"])["kd/crd/memory_student"]
    kept = sorted(updated - set(history[-1].index.tolist()))
    assert kept and not np.any(np.all(memory["kd/crd/memory_student"][kept] == initial[kept], axis=1))


def test_example_command_line(joint, tmp_path):
    """`python examples/train_ort.py joint.json --steps N --batch B --data f.npz` on a two-stage merge."""
    j = joint(COMMITTED, "ab")
    sidecar = copy_merge(j, tmp_path / "merge")
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((16, *mf.INPUT_SHAPE)).astype(np.float32), y=rng.integers(0, mf.NUM_CLASSES, 16))
    cmd = [sys.executable, str(ROOT / "examples" / "train_ort.py"), str(sidecar), "--steps", "2", "--init-steps", "2",
           "--batch", "4", "--data", str(data), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    student = sidecar.with_suffix(".student.onnx")
    assert f"trained student: {student}" in result.stdout, result.stdout
    assert "init [" in result.stdout and "main [" in result.stdout and "loss/ab" in result.stdout, result.stdout
    session = ort.InferenceSession(str(student), session_options(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((2, *mf.INPUT_SHAPE), np.float32)})
    assert logits.shape == (2, mf.NUM_CLASSES) and np.all(np.isfinite(logits))


def test_example_refuses_a_graph_and_a_sidecar_of_two_merges(joint, kdgraph_bin, tmp_path):
    """The graph of `-m kd -T 2 --alpha 0.5` beside the sidecar of a default `-m kd` merge: the sidecar's
    model_hash does not match the graph. `kdgraph check` refuses the pair; so must the example (one-line
    error, non-zero exit, no student written), before it generates any artifact."""
    default, other = joint(COMMITTED, "kd"), joint(COMMITTED, "kd", "-T", "2", "--alpha", "0.5")
    assert default.path.read_bytes() != other.path.read_bytes(), "the two merges wrote the same graph"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(other.path, mixed / default.path.name)
    shutil.copy(default.path.with_suffix(".json"), mixed / default.path.with_suffix(".json").name)
    sidecar = mixed / default.path.with_suffix(".json").name

    check = subprocess.run([str(kdgraph_bin), "check", str(mixed / default.path.name)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "different merges" in check.stderr, f"kdgraph check: exit {check.returncode}\n{check.stderr}"

    workdir = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "examples" / "train_ort.py"), str(sidecar), "--steps", "1", "--batch", "4",
           "--workdir", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, f"the example trained a graph with another merge's sidecar:\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "different merges" in lines[0], f"not a one-line error:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert not sidecar.with_suffix(".student.onnx").exists(), "a student was written"
    assert not workdir.exists() or not any(workdir.iterdir()), f"artifacts were generated: {list(workdir.iterdir())}"

    # The library refuses it too (train_ort.train, and a Stage made from the sidecar).
    with pytest.raises(train_ort.SidecarMismatch, match="different merges"):
        train_ort.train(sidecar, steps=1, batch=4, workdir=tmp_path / "lib", log=quiet)
    with pytest.raises(train_ort.SidecarMismatch, match="different merges"):
        train_ort.Stage(sidecar, tmp_path / "stage")


@pytest.mark.parametrize("method", ["kd", "ab"])
def test_example_hash_is_kdgraphs(joint, method):
    """train_ort.content_hash reproduces the model_hash that kdgraph records for each stage graph (else the
    refusal above would refuse every merge, or could not tell two merges apart)."""
    main = joint(COMMITTED, method)
    for spec in main.sidecar["stages"]:
        sidecar = json.loads((main.path.parent / spec["sidecar"]).read_text())
        graph = (main.path.parent / spec["model"]).read_bytes()
        assert sidecar.get("model_hash"), f"{spec['sidecar']} records no model_hash"
        assert train_ort.content_hash(graph) == sidecar["model_hash"], f"{spec['model']}"
        assert train_ort.content_hash(graph + b"\0") != sidecar["model_hash"]
