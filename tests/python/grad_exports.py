"""Torchvision classifiers exported in training mode for whole-model gradient checks, and torch autograd's gradients and updated BatchNorm statistics for them.

The models are exports.build's seeded classifiers with every Dropout and stochastic depth at
p = 0 (the export then holds no random draw, and torch's train-mode forward is deterministic),
exported as exports.py does in the two training-mode forms (ts-train, dynamo-noopt) at a size
and batch of the caller's choice. Exports are cached beside exports.py's, keyed by torch version,
model, mode, input size and a hash of this file and of exports.py.
"""

import contextlib
import functools
import hashlib
import itertools
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import exports
from gradient_cases import EXPORT_MODES

NUM_CLASSES = 1000  # torchvision's default head


def build(name):
    """exports.build(name) (seeded weights, non-trivial BatchNorms), in train mode, without
    randomness: every nn.Dropout and torchvision StochasticDepth at p = 0; parameters require grad.

    ConvNeXt's layer scales start at 1e-6: its blocks' gradients would then be 1e-6 of the
    whole, rounding noise to the checks (gradient_cases.ZERO_FRACTION). They are drawn from
    U(0.1, 0.3) instead (damped residual branches, as exports.build does for ResNets)."""
    model = exports.build(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Dropout, torchvision.ops.StochasticDepth)):
                module.p = 0.0
            if isinstance(module, torchvision.models.convnext.CNBlock):
                module.layer_scale.copy_(torch.empty(module.layer_scale.shape).uniform_(0.1, 0.3, generator=generator))
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def input_batch(size, batch, seed=0):
    """Standard-normal images (batch, 3, size, size) and labels in [0, NUM_CLASSES)."""
    rng = np.random.RandomState(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.randint(0, NUM_CLASSES, size=batch).astype(np.int64)
    return x, y


@functools.lru_cache(maxsize=None)
def _digest():
    text = Path(__file__).read_bytes() + Path(exports.__file__).read_bytes()
    return hashlib.sha256(text).hexdigest()[:10]


def export(name, mode, size):
    """Path of the cached training-mode export of `name` in `mode` at size x size (dynamic batch),
    exporting it first if needed; as exports.export (stale versions removed, failures not cached,
    exports.ExportFailed for a limit exports.KNOWN_EXPORT_FAILURES records)."""
    assert mode in EXPORT_MODES, mode
    key = f"torch{torch.__version__}-grad-{name}-{mode}-{size}px-{_digest()}".replace("+", "_")
    same = re.compile(rf"torch[^-]+-grad-{re.escape(name)}-{re.escape(mode)}-{size}px-[0-9a-f]+(\.partial)?")
    x, _ = input_batch(size, exports.BATCH)
    common = dict(input_names=["input"], output_names=["logits"])

    def write(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and mutation warnings
            exports._export_quiet(build(name), name, mode, path, torch.from_numpy(x), common)

    return exports.cached_export(exports.CACHE / key, same, write)


def torch_gradients(name, x, y, dtype=torch.float64):
    """(gradients, running statistics) of build(name) in train mode on (x, y), computed in
    `dtype`: d F.cross_entropy(model(x), y) / d parameter by state_dict name, and every
    BatchNorm's running_mean / running_var after that one forward pass (momentum 0.1, unbiased
    variance)."""
    model = build(name).to(dtype)
    loss = F.cross_entropy(model(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
    loss.backward()
    gradients = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    statistics = {n: b.detach().numpy().copy() for n, b in model.named_buffers()
                  if n.endswith(("running_mean", "running_var"))}
    return gradients, statistics


# A pre-activation is "undecided" where it lies within MASK_BAND times float32's own forward error
# (torch float32 against float64, at that activation, its largest element) of a kink: any float32
# engine may put it on either side, and its gradient mask with it.
MASK_BAND = 4.0


@contextlib.contextmanager
def _kinked_activations(recorded=None, flips=None):
    """Within the block, every F.relu and F.hardtanh call (nn.ReLU, nn.ReLU6 and DenseNet's functional
    relu go through them) appends its input to `recorded`, or, with `flips` (one boolean tensor per
    call, in call order), keeps its forward value and flips its gradient mask where flips[i] is set."""
    relu, hardtanh = F.relu, F.hardtanh
    calls = itertools.count()

    def through(x, low, high, y):
        i = next(calls)
        if flips is None:
            recorded.append((x.detach().clone(), low, high))
            return y
        mask = ((x > low) & (x < high)) ^ flips[i]
        return y.detach() + (x - x.detach()) * mask.to(x.dtype)

    def kinked_relu(x, inplace=False):
        return through(x, 0.0, float("inf"), relu(x))

    def kinked_hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
        return through(x, min_val, max_val, hardtanh(x, min_val, max_val))

    F.relu, F.hardtanh = kinked_relu, kinked_hardtanh
    try:
        yield
    finally:
        F.relu, F.hardtanh = relu, hardtanh


def mask_flip_floor(name, x, y, gradients):
    """({parameter: relative change of its float64 gradient}, number of undecided masks) when every
    ReLU / ReLU6 mask undecided in float32 (MASK_BAND) is flipped: how far float32 rounding alone may
    move each gradient of this model on this batch, whatever engine computes it. `gradients` are
    torch_gradients' float64 ones. Hardswish's kinks and MaxPool's ties are not counted."""
    forwards = {}
    for dtype in (torch.float64, torch.float32):
        recorded = []
        with _kinked_activations(recorded=recorded), torch.no_grad():
            build(name).to(dtype)(torch.from_numpy(x).to(dtype))
        forwards[dtype] = recorded
    flips = []
    for (x64, low, high), (x32, _, _) in zip(forwards[torch.float64], forwards[torch.float32], strict=True):
        band = MASK_BAND * float((x32.double() - x64).abs().max())
        flips.append(((x64 - low).abs() < band) | ((x64 - high).abs() < band))
    model = build(name).to(torch.float64)
    with _kinked_activations(flips=flips):
        F.cross_entropy(model(torch.from_numpy(x).to(torch.float64)), torch.from_numpy(y)).backward()
    flipped = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    change = {n: float(np.linalg.norm(flipped[n] - g) / max(np.linalg.norm(g), 1e-300)) for n, g in gradients.items()}
    return change, int(sum(int(f.sum()) for f in flips))
