"""EfficientNet (issue 10.4): SiLU is x * Sigmoid(x), one activation; the stem ends after it and
each stage at its last block's output (16/24/40/112/320 channels for b0), not at the next
block's expansion. Checked against torch forward hooks on torchvision efficientnet_b0."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import torch
import torchvision

from merge_checks import run_with_taps

SIZE = 64


def test_efficientnet_b0_taps_are_block_outputs(kdgraph_bin, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0().eval()
    path = tmp_path / "efficientnet_b0.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17)
    info = json.loads(subprocess.run([str(kdgraph_bin), "inspect", str(path), "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    # The stem (features[0]: conv, BN, SiLU) and the ends of the stages that change resolution or
    # end the network: features[1], [2], [3], [5], [7].
    modules = [model.features[i] for i in (0, 1, 2, 3, 5, 7)]
    want = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: want.__setitem__(i, out.detach().numpy()))
             for i, m in enumerate(modules)]
    x = np.random.RandomState(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    stages = info["stages"]
    assert [s["shape"][1] for s in stages] == [32, 16, 24, 40, 112, 320], stages
    import onnx
    got = run_with_taps(onnx.load(str(path)), [s["tensor"] for s in stages], {"input": x})
    for i, stage in enumerate(stages):
        np.testing.assert_allclose(got[stage["tensor"]], want[i], rtol=1e-4, atol=1e-4, err_msg=stage["name"])
