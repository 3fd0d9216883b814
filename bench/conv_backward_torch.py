"""PyTorch's side of conv_backward.py: for each layer, eager forward (grad enabled) against forward
plus backward (dX, dW, dB), interleaved; prints JSON. Takes one argument, the JSON spec
conv_backward.py passes: {"layers": {name: [c, h, w, m, k, s, p, group]}, "batch", "threads",
"repeats", "iterations"}. Run with OMP_WAIT_POLICY=PASSIVE for CPU times that count work."""

import json
import sys

import torch
import torch.nn.functional as F

from timing import time_pair


def time_layer(layer, batch, repeats, iterations):
    c, h, w, m, k, s, p, g = layer
    x = torch.randn(batch, c, h, w, requires_grad=True)
    weight = torch.randn(m, c // g, k, k, requires_grad=True)
    bias = torch.randn(m, requires_grad=True)

    def forward():
        return F.conv2d(x, weight, bias, stride=s, padding=p, groups=g)

    r = torch.randn_like(forward())

    def both():
        forward().backward(r)

    return time_pair(forward, both, repeats, iterations)


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    layers = {
        name: time_layer(layer, spec["batch"], spec["repeats"], spec["iterations"])
        for name, layer in spec["layers"].items()
    }
    print(json.dumps({"torch": torch.__version__, "layers": layers}))


if __name__ == "__main__":
    main()
