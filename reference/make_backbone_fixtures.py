"""Backbone parity fixtures (run from the repository root): EfficientNet B0 and B5 from `efficientnet_pytorch`
and Lite0 from `efficientnet_lite_pytorch`, every parameter and BatchNorm statistic set by the seeded formula
of csflow_ref.py (so the 120 MB of B5 weights are never stored), inputs from the same formula.

    python reference/make_backbone_fixtures.py
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
import csflow_ref as ref  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "csflow", "tests", "fixtures")
torch.set_num_threads(2)


def spread(name, shape):
    """(centre, half width) of the uniform formula values for a tensor, by its role."""
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return 0.0, math.sqrt(3.0 / fan_in)
    if name.endswith("running_var") or (name.endswith(".weight") and "_bn" in name):
        return 1.0, 0.5
    return 0.0, 0.1


def fill(model, seed):
    shapes = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype != torch.float32:
                continue
            c, h = spread(name, list(t.shape))
            u = ref.formula_uniform(name, t.numel(), seed)
            t.copy_(torch.from_numpy(np.float32(c) + np.float32(h) * u).reshape(t.shape))
            shapes[name] = list(t.shape)
    return shapes


def taps(model, x, block):
    x = model._swish(model._bn0(model._conv_stem(x)))
    for idx, b in enumerate(model._blocks):
        x = b(x)
        if idx == block:
            return x


def case(tag, model, block, seed, sizes, logits):
    model.eval()
    shapes = fill(model, seed)
    out = {}
    for h, w in sizes:
        x = torch.from_numpy(np.float32(2.0) * ref.formula_uniform(f"input{h}x{w}", 3 * h * w, seed)).reshape(1, 3, h, w)
        with torch.no_grad():
            for s in range(3):
                xs = F.interpolate(x, size=(h // 2**s, w // 2**s)) if s > 0 else x
                out[f"feat_{h}x{w}_scale{s}"] = taps(model, xs, block).numpy()
            if logits:
                out[f"logits_{h}x{w}"] = model(x).numpy()
    save_file(out, os.path.join(OUT, f"backbone_{tag}.safetensors"),
              metadata={"seed": str(seed), "block": str(block), "sizes": json.dumps(sizes), "shapes": json.dumps(shapes)})
    print(tag, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    from efficientnet_pytorch import EfficientNet
    from efficientnet_lite_pytorch import EfficientNet as EfficientNetLite
    case("b0", EfficientNet.from_name("efficientnet-b0"), 14, 11, [[256, 256], [384, 256]], True)
    case("b5", EfficientNet.from_name("efficientnet-b5"), 35, 12, [[256, 256], [384, 256]], False)
    case("lite0", EfficientNetLite.from_name("efficientnet-lite0"), 14, 13, [[256, 256]], True)
