"""Real students of issue 9, exported in training mode, for test_real_students.py.

torchvision mobilenet_v3_small (HardSwish, HardSigmoid, Dropout), shufflenet_v2_x1_0 (channel
split, a ReduceMean head), convnext_tiny (LayerNormalization, stochastic depth) and a small
VisionTransformer (LayerNormalization, attention, Dropout), seeded, in train mode, at 64x64.
The ViT is torchvision's VisionTransformer class with two layers, two heads and width 64 at
patch 16 (vit_b_16 is the same class at 12 layers, 12 heads and width 768: 86M parameters, too
big for a test); 64x64 lets every student share the cached resnet18 teacher of exports.py.

Modes:
  ts-train:     TorchScript exporter, opset 17, TrainingMode.TRAINING, no constant folding:
                BatchNormalization with training_mode=1, Dropout with training_mode=True,
                stochastic depth as RandomUniformLike < p.
  dynamo-train: torch.export-based exporter with its defaults (opset 20, optimize=True), model in
                train mode: Dropout and stochastic depth as RandomUniformLike < p chains; BatchNorm
                is written in inference form and folded into the convolutions by the optimiser.

Exports are cached beside exports.py's (tests/python/.cache/torchvision), keyed by torch
version, model, mode, input size and a hash of this file; exports.py's own cache is untouched.
"""

import copy
import functools
import hashlib
import re
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

import exports

STUDENTS = ("mobilenet_v3_small", "shufflenet_v2_x1_0", "convnext_tiny", "vit")
MODES = ("ts-train", "dynamo-train")
INPUT_SIZE = exports.DEFAULT_INPUT_SIZE  # 64, the size of the cached resnet18 teacher
TEACHER = ("resnet18", "ts-eval")
NUM_CLASSES = 1000  # torchvision's default, as the teacher's

# Exports that this torch cannot make: {(mode, name): [(torch version prefix, reason)]}, as
# exports.KNOWN_EXPORT_FAILURES; any other exporter error fails the test.
KNOWN_EXPORT_FAILURES = {}


def _vit():
    return torchvision.models.VisionTransformer(
        image_size=INPUT_SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
        num_classes=NUM_CLASSES)


@functools.lru_cache(maxsize=None)
def _build_cached(name):
    """Seeded weights, every parameter with values of its own.

    torch.export's optimiser merges initializers of equal value: a fresh model's norm weights
    (all ones), zero biases and layer scales (all 1e-6) would become one tensor shared by every
    layer, parameters tied that the model keeps apart. Parameters whose elements are all equal
    are therefore drawn again (zeros ~ N(0, 0.02), constants c ~ c * U(0.5, 1.5) per element).
    """
    torch.manual_seed(0)
    model = _vit() if name == "vit" else getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.reshape(-1)
            if flat.numel() and bool(torch.all(flat == flat[0])):
                value = float(flat[0])
                if value == 0.0:
                    p.normal_(0.0, 0.02)
                else:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.train()
    return model


def build(name):
    """A fresh copy of the seeded student, in train mode."""
    assert name in STUDENTS, name
    return copy.deepcopy(_build_cached(name))


def input_batch(batch, seed=0):
    return exports.input_batch("student", batch, seed)


@functools.lru_cache(maxsize=None)
def _file_digest():
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def cache_dir(name, mode):
    key = f"torch{torch.__version__}-student-{name}-{mode}-{INPUT_SIZE}px-{_file_digest()}"
    return exports.CACHE / key.replace("+", "_")


def known_export_failure(name, mode, version=None):
    return exports.known_failure(KNOWN_EXPORT_FAILURES, name, mode, version)


def export(name, mode):
    """Path of the cached export of student `name` in `mode`, exporting it first if needed (as
    exports.export: stale versions removed, failures not cached, ExportFailed for a recorded limit)."""
    assert mode in MODES, mode
    same = re.compile(rf"torch[^-]+-student-{re.escape(name)}-{re.escape(mode)}-\d+px-[0-9a-f]+(\.partial)?")
    return exports.cached_export(cache_dir(name, mode), same,
                                 lambda path: _export(build(name), name, mode, path))


def _export(model, name, mode, path):
    x = torch.from_numpy(input_batch(exports.BATCH))
    common = dict(input_names=["input"], output_names=["logits"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and mutation warnings
            if mode == "ts-train":
                original = {k: v.clone() for k, v in model.state_dict().items()}
                torch.onnx.export(
                    model, (x,), str(path), dynamo=False, opset_version=17,
                    training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **common,
                )
            else:
                torch.onnx.export(
                    model, (x,), str(path), dynamo=True,
                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False, **common,
                )
    except Exception as exc:
        raise exports.export_failure(exc, name, mode, known_export_failure(name, mode)) from exc
    if mode == "ts-train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        exports._restore_running_stats(path, original)
