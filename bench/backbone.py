"""PyTorch side of crates/csflow/benches/backbone.rs (medians): depthwise 5x5 conv, 240 channels, 96x96;
three-scale extraction, Lite0 at 256 px (block 14) and B5 at 768 px (block 35), batch 1, eval, no grad.

    python bench/backbone.py [reps]
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def timed(n, f):
    f()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def extraction(model, block, size, n):
    model.eval()
    xs = [torch.randn(1, 3, size >> s, size >> s) for s in range(3)]

    def run():
        with torch.no_grad():
            for x in xs:
                y = model._swish(model._bn0(model._conv_stem(x)))
                for i, b in enumerate(model._blocks):
                    y = b(y)
                    if i == block:
                        break
    return timed(n, run)


x = torch.randn(1, 240, 96, 96)
w = torch.randn(240, 1, 5, 5)
with torch.no_grad():
    dw = timed(reps * 4, lambda: F.conv2d(x, w, padding=2, groups=240))
print(f"pytorch {torch.__version__} threads {torch.get_num_threads()}: depthwise 5x5 240ch 96x96 {dw * 1e3:.2f} ms")
from efficientnet_lite_pytorch import EfficientNet as Lite  # noqa: E402
from efficientnet_pytorch import EfficientNet  # noqa: E402
print(f"pytorch lite0 256px 3 scales: {extraction(Lite.from_name('efficientnet-lite0'), 14, 256, reps):.3f} s")
print(f"pytorch b5 768px 3 scales: {extraction(EfficientNet.from_name('efficientnet-b5'), 35, 768, min(reps, 3)):.3f} s")
