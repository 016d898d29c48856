"""What bench/workloads.py and bench/engine_accuracy.py both run in PyTorch and export to OpenVINO: the
backbone up to its feature block, the flow with tensor inputs, and csflow's preprocessing (Pillow bilinear
resize, ImageNet normalisation, a three-level pyramid by nearest 2x downsampling)."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


class FlowZ(torch.nn.Module):
    """The flow with three tensor inputs and the latents out (what ONNX exports)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, a, b, c):
        z, _ = self.flow([a, b, c])
        return z[0], z[1], z[2]


class Tap(torch.nn.Module):
    """EfficientNet up to its feature block (eval: BatchNorm uses running statistics)."""

    def __init__(self, net, block, lite):
        super().__init__()
        self.net, self.block, self.lite = net.eval(), block, lite

    def forward(self, x):
        n = self.net
        y = n._bn0(n._conv_stem(x))
        y = F.relu6(y) if self.lite else n._swish(y)
        for i, b in enumerate(n._blocks):
            y = b(y)
            if i == self.block:
                break
        return y


def pyramid(img, h, w):
    """A decoded RGB image as csflow's three normalised input levels, [1, 3, h >> s, w >> s]."""
    x = (np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255 - MEAN) / STD
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
    return [x] + [F.interpolate(x, scale_factor=0.5 ** s, mode="nearest") for s in (1, 2)]


def score(z):
    """The image score: mean z² over all scales' latents, halved."""
    return float(np.concatenate([np.asarray(t, np.float64).reshape(1, -1) for t in z], 1).__pow__(2).mean() / 2)
