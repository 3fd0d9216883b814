"""Checks `kdgraph inspect`'s taps on every fixture architecture against the PyTorch models' feats."""

import copy
import json
import subprocess

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch

from conftest import FIXTURES, fixture_path, mf

# (rtol, atol) by export mode. The references are computed in float64. With batch-statistics
# BN, rounding errors grow through the depth: on resnet56 and mobile_half, float32 PyTorch
# itself strays from float64 by up to 0.7e-4 * (1 + |x|), hence the looser train tolerance
# (a wrong tap differs by O(1)).
TOLERANCE = {"eval": (1e-4, 1e-4), "train": (1e-3, 1e-3)}


# Whether each entry of `stages` (stem first) ends in a ReLU, by architecture family.
# True: pre_relu must name the ReLU's input; "bn": the stage end is a raw residual sum and the
# next block opens with BN + ReLU (pre-activation WRN), so pre_relu must name that BN's output;
# False: pre_relu must be null. ShuffleV2's stage
# ends are channel shuffles of concat(x1, ReLU(..)), made by a Reshape, not a ReLU: null (the
# reference's pre-ReLU feat is an unshuffled concat that the graph does not contain).
RELU_AT_STAGE_END = {
    "resnet": [True, True, True, True],
    "wrn": [False, "bn", "bn", "bn"],
    "vgg": [True, True, True, True, True],
    "mobile_half": [True, False, False, False, False],
    "ShuffleV2": [True, False, False, False],
    "plain": [True, True, True, True],
}


def relu_at_stage_end(name):
    family = next(f for f in RELU_AT_STAGE_END if name.startswith(f))
    return RELU_AT_STAGE_END[family]


def inspect(kdgraph_bin, path):
    result = subprocess.run(
        [str(kdgraph_bin), "inspect", str(path), "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"kdgraph inspect failed:\n{result.stderr}"
    assert result.stdout.strip(), f"kdgraph inspect printed nothing:\n{result.stderr}"
    return json.loads(result.stdout)


def run_with_outputs(path, names, x):
    """Runs the model in onnxruntime with `names` added as graph outputs; returns {name: array}."""
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(list(names), {"input": x})
    return dict(zip(names, outputs))


def torch_feats(name, mode, x):
    """(post-ReLU feats, preact feats, logits) of the PyTorch model in float64.

    A train-mode model normalises with batch statistics (and updates its running ones, hence
    the copies).
    """
    model = mf.build(name).double()
    model.train(mode == "train")
    x = torch.from_numpy(x).double()
    with torch.no_grad():
        post, logits = copy.deepcopy(model)(x, is_feat=True)
        pre, _ = copy.deepcopy(model)(x, is_feat=True, preact=True)
        if mode == "eval" and name.startswith("wrn"):
            # The stem's only reader is the first block's BN, which the eval export folds into
            # the stem conv: the graph's stem tensor is that BN's output, f0 itself is not there.
            post[0] = pre[0] = model.block1.layer[0].bn1(post[0])
    return [f.numpy() for f in post], [f.numpy() for f in pre], logits.numpy()


def check_tensor(what, shape, got, want, batch, mode):
    assert shape[0] == batch, f"{what}: batch dim {shape[0]!r}, expected the input's {batch!r}"
    assert list(shape[1:]) == list(want.shape[1:]), f"{what}: shape {shape} vs torch {list(want.shape)}"
    assert got.shape == want.shape, f"{what}: onnxruntime shape {got.shape} vs torch {want.shape}"
    rtol, atol = TOLERANCE[mode]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def batch():
    return np.random.RandomState(0).standard_normal((4, *mf.INPUT_SHAPE)).astype(np.float32)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", mf.MODEL_NAMES)
def test_taps_match_torch_feats(kdgraph_bin, name, mode, batch):
    path = fixture_path(name, mode)
    info = inspect(kdgraph_bin, path)
    post, pre, logits = torch_feats(name, mode, batch)

    assert [i["name"] for i in info["inputs"]] == ["input"]
    input_shape = info["inputs"][0]["shape"]
    assert isinstance(input_shape[0], str), f"input batch dim should be symbolic: {input_shape}"
    assert input_shape[1:] == list(mf.INPUT_SHAPE)
    n = input_shape[0]

    stages = info["stages"]
    assert [s["index"] for s in stages] == list(range(len(post) - 1))
    names = [s["tensor"] for s in stages] + [s["pre_relu"] for s in stages if s["pre_relu"]]
    names += [info["embedding"]["tensor"], info["logits"]["tensor"]]
    got = run_with_outputs(path, names, batch)

    for stage, want_post, want_pre, has_relu in zip(stages, post, pre, relu_at_stage_end(name)):
        where = f"stage {stage['index']} ({stage['tensor']})"
        check_tensor(where, stage["shape"], got[stage["tensor"]], want_post, n, mode)
        if has_relu:
            assert stage["pre_relu"] is not None, f"{where} ends in a ReLU (or opens a BN + ReLU): pre_relu expected"
        else:
            assert stage["pre_relu"] is None, f"{where} has no ReLU at its end: pre_relu must be null"
        if stage["pre_relu"]:
            # A tap's pre-ReLU tensor has the tap's shape.
            check_tensor(f"{where} pre_relu ({stage['pre_relu']})", stage["shape"],
                         got[stage["pre_relu"]], want_pre, n, mode)
    emb = info["embedding"]
    check_tensor(f"embedding ({emb['tensor']})", emb["shape"], got[emb["tensor"]], post[-1], n, mode)
    out = info["logits"]
    assert out["tensor"] == "logits"
    check_tensor("logits", out["shape"], got["logits"], logits, n, mode)


@pytest.mark.parametrize("name, mode, file", mf.COMMITTED, ids=[c[2] for c in mf.COMMITTED])
def test_committed_fixture_is_current(name, mode, file, tmp_path):
    """The committed file is what make_fixtures.py writes today: the same graph byte for byte, and
    the same weights up to float32 rounding (1e-6 of each tensor's largest value): the exporter's
    BatchNorm folding may round differently on another CPU (measured: a folded conv bias of
    resnet56, its small elements 1e-5 apart relative, one ulp of the tensor's scale)."""
    fresh = tmp_path / file
    mf.export(mf.build(name), fresh, mode)
    stale = f"fixtures/{file} is stale: rerun `python fixtures/make_fixtures.py`"
    if fresh.read_bytes() == (FIXTURES / file).read_bytes():
        return
    made, committed = onnx.load(str(fresh)), onnx.load(str(FIXTURES / file))
    weights = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    made_weights, committed_weights = weights(made), weights(committed)
    assert made_weights.keys() == committed_weights.keys(), stale
    for n, w in made_weights.items():
        assert w.dtype == committed_weights[n].dtype and w.shape == committed_weights[n].shape, f"{stale} ({n})"
        c = committed_weights[n]
        scale = float(np.max(np.abs(c))) if c.size else 0.0
        assert np.max(np.abs(w - c), initial=0.0) <= 1e-6 * scale, f"{stale} ({n} differs beyond rounding)"
    for m in (made, committed):
        del m.graph.initializer[:]
    assert made.SerializeToString() == committed.SerializeToString(), f"{stale} (the graph differs)"
