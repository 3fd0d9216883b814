"""Seeded torchvision classifiers, their ONNX exports in the four ways PyTorch offers, and
PyTorch reference values for the taps (stage ends, pre-activations, embedding, logits).

Exports are cached under tests/python/.cache/torchvision, keyed by torch version, model,
export mode, input size and a hash of this file (a change here re-exports everything).
"""

import copy
import functools
import hashlib
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "torchvision"

MODELS = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "wide_resnet50_2")

# The four ways of exporting, as the issue lists them.
#   ts-eval:      TorchScript exporter, opset 17, eval mode: BatchNorm folded into Conv.
#   ts-train:     TorchScript exporter, opset 17, TrainingMode.TRAINING, no constant folding:
#                 BatchNormalization kept with training_mode=1 and three outputs; Dropout kept
#                 with training_mode=True.
#   dynamo:       torch.export-based exporter (opset 20), default optimisation, eval mode:
#                 BatchNorm folded.
#   dynamo-noopt: torch.export-based exporter, optimize=False, model in train mode (the
#                 student a user would export for training): BatchNormalization kept (the
#                 exporter writes it in inference form), Dropout kept with training_mode=True,
#                 Shape/Constant/CastLike/Expand chains added.
MODES = ("ts-eval", "ts-train", "dynamo", "dynamo-noopt")

BATCH = 2
# 64x64 leaves every model four resolution drops after its stem (resnets end at 2x2). vgg16_bn
# is the exception: its AdaptiveAvgPool2d((7, 7)) would have to turn 2x2 into 7x7, which the
# TorchScript exporter refuses ("output size that are not factor of input size"), so it gets
# 224x224 (final map 7x7, the pool is then exact), where its stage ends are 224..14.
INPUT_SIZE = {"vgg16_bn": 224}
DEFAULT_INPUT_SIZE = 64


def input_size(name):
    return INPUT_SIZE.get(name, DEFAULT_INPUT_SIZE)


def input_batch(name, batch=BATCH, seed=0):
    size = input_size(name)
    return np.random.RandomState(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@functools.lru_cache(maxsize=None)
def _build_cached(name):
    """The model with seeded random weights and non-trivial BatchNorm parameters, in eval mode.

    BN affine parameters are random; running statistics are first calibrated on a random batch
    (so that activations keep a sane scale through 50+ layers) and then perturbed, so that
    folding BN into the convolutions changes the weights for real.
    """
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    bns = _batchnorms(model)
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
        # A random deep network with unit-gain residual branches is chaotic: float32 rounding
        # grows ~40x from layer1 to layer4 of resnet50 (and from features[1] to features[17] of
        # mobilenet_v2) and exceeds atol 1e-4 in torch itself. Damped residual branches (a
        # zero_init_residual-like start, still non-trivial to fold) keep the values comparable
        # at the tolerance.
        for block in model.modules():
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                block.bn3.weight.uniform_(0.1, 0.3)
            elif isinstance(block, torchvision.models.resnet.BasicBlock):
                block.bn2.weight.uniform_(0.1, 0.3)
            elif isinstance(block, torchvision.models.mobilenetv2.InvertedResidual) and block.use_res_connect:
                block.conv[-1].weight.uniform_(0.1, 0.3)
        # Calibration at 64x64 for every model (cheap even for vgg16_bn; only scales matter).
        calib = torch.randn(4, 3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch gives that batch's stats
        model.train()
        model(calib)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.1 * std * torch.randn_like(std))
            bn.running_var.mul_(torch.empty_like(std).uniform_(0.7, 1.4))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build(name):
    """A fresh copy of the seeded model (eval mode); callers may mutate it."""
    return copy.deepcopy(_build_cached(name))


@functools.lru_cache(maxsize=None)
def _file_digest():
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def cache_dir(name, mode):
    key = f"torch{torch.__version__}-{name}-{mode}-{input_size(name)}px-{_file_digest()}"
    return CACHE / key.replace("+", "_")


class ExportFailed(Exception):
    """torch.onnx.export raised where KNOWN_EXPORT_FAILURES says this torch version cannot export
    the model in that mode (the test then xfails, naming the version and the reason)."""


# Exports that a torch version is known not to manage, each with the reason:
# {(mode, model): [(torch version prefix, reason)]}. Every other exception of the exporter fails
# the test: a broken environment must not give a green run. With the pinned torch
# (requirements.txt) every model exports in every mode, so the table is empty; add an entry only
# with the version and the upstream reason, e.g.
#   ("dynamo", "vgg16_bn"): [("2.4.", "torch.export in 2.4 cannot trace AdaptiveAvgPool2d(7) ...")].
KNOWN_EXPORT_FAILURES = {}


def known_export_failure(name, mode, version=None):
    """The recorded reason why this torch version cannot export `name` in `mode`, else None."""
    return known_failure(KNOWN_EXPORT_FAILURES, name, mode, version)


def known_failure(table, name, mode, version=None):
    """The reason `table` ({(mode, name): [(torch version prefix, reason)]}) records for this torch."""
    version = torch.__version__ if version is None else version
    for prefix, reason in table.get((mode, name), ()):
        if version.startswith(prefix):
            return reason
    return None


def export(name, mode):
    """Path of the cached export of `name` in `mode`, exporting it first if needed.

    Raises ExportFailed (with the version, the recorded reason and the exporter's message) when
    this torch version is known not to export it; any other exporter error propagates. Failures
    are not cached: a rerun tries again.
    """
    assert mode in MODES, mode
    # Exports made by an older exports.py or torch for the same model and mode are stale.
    same = re.compile(rf"torch[^-]+-{re.escape(name)}-{re.escape(mode)}-\d+px-[0-9a-f]+(\.partial)?")
    return cached_export(cache_dir(name, mode), same, lambda path: _export(build(name), name, mode, path))


def cached_export(final, stale, write):
    """`final`/model.onnx, written by `write(path)` first if missing: into a .partial folder renamed
    when done (a failure leaves nothing), after removing the folders whose names match `stale`."""
    model_path = final / "model.onnx"
    if model_path.exists():
        return model_path
    if CACHE.exists():
        for old in CACHE.glob("*"):
            if old.is_dir() and stale.fullmatch(old.name) and old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write(partial / "model.onnx")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return model_path


def export_failure(exc, name, mode, reason):
    """The ExportFailed that replaces `exc` where `reason` records a known limit; else re-raises."""
    if reason is None:
        raise exc  # not a known limit of this torch: the environment or the model is broken
    message = (f"torch {torch.__version__} is known not to export {name} in {mode} mode: {reason} "
               f"({type(exc).__name__}: {exc})")
    return ExportFailed(message[:4000])


def _export(model, name, mode, path):
    x = torch.from_numpy(input_batch(name))
    common = dict(input_names=["input"], output_names=["logits"])
    with warnings.catch_warnings():
        # The exporters' deprecation and "removing mutation" warnings are expected noise.
        warnings.simplefilter("ignore")
        _export_quiet(model, name, mode, path, x, common)


def _export_quiet(model, name, mode, path, x, common):
    try:
        if mode.startswith("ts-"):
            train = mode == "ts-train"
            original = {k: v.clone() for k, v in model.state_dict().items()}
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=17,
                training=torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL,
                do_constant_folding=not train,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **common,
            )
        else:
            model.train(mode == "dynamo-noopt")
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, optimize=(mode == "dynamo"),
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
                **common,
            )
    except Exception as exc:
        raise export_failure(exc, name, mode, known_export_failure(name, mode)) from exc
    if mode == "ts-train":
        _restore_running_stats(path, original)


def _restore_running_stats(path, original):
    """The TorchScript exporter traces a training-mode forward, which updates the BN running
    statistics before they are written; put the model's own statistics back into the file so
    that the export and the reference model hold the same numbers."""
    model = onnx.load(str(path))
    wanted = {k for k in original if k.endswith(("running_mean", "running_var"))}
    seen = set()
    for init in model.graph.initializer:
        if init.name in wanted:
            init.CopyFrom(numpy_helper.from_array(original[init.name].numpy(), init.name))
            seen.add(init.name)
    missing = wanted - seen
    assert not missing, f"running statistics not found as initializers: {sorted(missing)[:5]}"
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------
# Reference taps, found from the torchvision module structure (independently of kdgraph).

def _tap_modules(name, model):
    """[(stage module, activation module or None, activation kind)], final Linear.

    A stage's value is its module's output; its pre-activation is the input of the LAST call of
    the activation module during the forward (resnet blocks call `relu` several times, the last
    one after the residual Add).
    """
    if name.startswith(("resnet", "wide_resnet")):
        stages = [(model.relu, model.relu, "relu")]
        stages += [(layer, layer[-1].relu, "relu")
                   for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
        return stages, model.fc
    if name == "vgg16_bn":
        f = model.features
        pools = [i for i, m in enumerate(f) if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == 5
        stages = []
        for p in pools:
            assert isinstance(f[p - 1], nn.ReLU)
            stages.append((f[p - 1], f[p - 1], "relu"))
        return stages, model.classifier[6]
    if name == "mobilenet_v2":
        f = model.features
        assert isinstance(f[0][2], nn.ReLU6)
        stages = [(f[0], f[0][2], "relu6")]
        # Last block before each resolution drop, then the last inverted-residual block at the
        # final resolution (features[18], the 1x1 head conv to 1280, is not a stage).
        stages += [(f[i], None, None) for i in (1, 3, 6, 13, 17)]
        return stages, model.classifier[1]
    raise ValueError(name)


@functools.lru_cache(maxsize=None)
def reference(name):
    """PyTorch eval-mode values on input_batch(name): dict with
    stages: [{"value", "pre", "act"}] (pre is None where the stage does not end in an
    activation), embedding, logits."""
    model = build(name)
    stage_specs, fc = _tap_modules(name, model)
    outs, pres, emb = {}, {}, {}
    hooks = []
    for i, (module, act, _) in enumerate(stage_specs):
        hooks.append(module.register_forward_hook(
            lambda m, inp, out, i=i: outs.__setitem__(i, out.detach().clone())))
        if act is not None:
            hooks.append(act.register_forward_pre_hook(
                lambda m, inp, i=i: pres.__setitem__(i, inp[0].detach().clone())))
    hooks.append(fc.register_forward_pre_hook(
        lambda m, inp: emb.__setitem__("x", inp[0].detach().clone())))
    # Computed in float64, so that the comparison measures the export's float32 rounding only.
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(input_batch(name)).double())
    for h in hooks:
        h.remove()
    stages = []
    for i, (_, act, kind) in enumerate(stage_specs):
        stages.append({
            "value": outs[i].numpy(),
            "pre": pres[i].numpy() if act is not None else None,
            "act": kind,
        })
    return {"stages": stages, "embedding": emb["x"].numpy(), "logits": logits.numpy()}
