"""The PyTorch and OpenVINO side of crates/csflow/benches/workloads.rs: one workload per run, printing
{"median": seconds}. OpenVINO runs the same PyTorch modules exported to ONNX (opset 17) with its default
settings on this CPU (`openvino`), or with float32 inference asked for (`openvino-f32`: its bfloat16 default
moves a trained model's scores by 1e-2 to 3e-2, bench/engine_accuracy.py); it has no training, so only forward
workloads run there.

    python bench/workloads.py <pytorch|openvino|openvino-f32> <workload> [reps] [image]

BENCH_DIST=1 prints the deciles of the repetitions' times on stderr.
"""
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import csflow_ref as ref  # noqa: E402
from modules import FlowZ, Tap, pyramid, score  # noqa: E402

engine, workload = sys.argv[1], sys.argv[2]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
image = sys.argv[4] if len(sys.argv) > 4 else os.path.join(os.path.dirname(__file__), "..", "assets", "brick.png")
LITE0 = os.path.join(os.path.dirname(__file__), "..", "assets", "efficientnet-lite0-57934424.pth")
threads = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(threads)
torch.manual_seed(0)


def timed(f):
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    if os.environ.get("BENCH_DIST"):
        v = sorted(out)
        print("deciles ms: " + " ".join(f"{v[(len(v) - 1) * i // 10] * 1e3:.2f}" for i in range(11)), file=sys.stderr)
    return statistics.median(out)


def make_flow(c, hidden):
    flow = ref.Flow(c, hidden).eval()
    with torch.no_grad():
        for n, p in flow.named_parameters():
            if "gamma" in n:
                p.fill_(0.1)
    return flow


def backbone(name):
    if name == "lite0":
        from efficientnet_lite_pytorch import EfficientNet as Lite
        net = Lite.from_name("efficientnet-lite0")
        # The real weights (scripts/setup.sh): random ones give vanishing activations, and denormal numbers
        # would time something no user runs.
        net.load_state_dict(torch.load(LITE0, map_location="cpu", weights_only=True))
        return Tap(net, 14, True)
    from efficientnet_pytorch import EfficientNet
    net = EfficientNet.from_name("efficientnet-b5")
    net.set_swish(memory_efficient=False)  # the exportable Swish
    return Tap(net, 35, False)


def runner(module, inputs):
    """A callable running `module` on numpy inputs, in PyTorch or compiled by OpenVINO from ONNX."""
    if engine == "pytorch":
        def run(*xs):
            with torch.no_grad():
                out = module(*[torch.from_numpy(x) for x in xs])
            return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        return run
    import openvino as ov
    config = {"INFERENCE_NUM_THREADS": threads}
    if engine == "openvino-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    # The ONNX file (up to 1.1 GB at the paper size) is gone once compiled.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(module, tuple(torch.from_numpy(x) for x in inputs), path, dynamo=False, opset_version=17)
        compiled = ov.Core().compile_model(path, "CPU", config)
    return lambda *xs: list(compiled(list(xs)).values())


def flow_workload(c, hidden, batch, m):
    x = [np.random.randn(batch, c, m >> i, m >> i).astype(np.float32) for i in range(3)]
    run = runner(FlowZ(make_flow(c, hidden)), x)
    return timed(lambda: run(*x))


def step_workload(c, hidden, batch, m):
    flow = make_flow(c, hidden).train()
    x = [torch.randn(batch, c, m >> i, m >> i) for i in range(3)]
    opt = ref.make_adam(flow, 2e-4)
    return timed(lambda: ref.train_step(flow, opt, x))


def extraction_workload(name, size, levels=range(3)):
    xs = [np.random.randn(1, 3, size >> s, size >> s).astype(np.float32) for s in levels]
    net = backbone(name)
    runs = [runner(net, [x]) for x in xs]  # one compiled model per input size
    return timed(lambda: [r(x) for r, x in zip(runs, xs)])


def predict_workload(batch=1):
    """Image files to their scores and full-size anomaly maps, `batch` at a time as `csflow predict --batch-size`
    scores a folder: each decoded, PIL-resized, normalised, its three scales through Lite0; the flow on the
    batch at once; per image the mean z^2 map upsampled (bilinear, align_corners=False) to its size. Returns
    the time per image."""
    from PIL import Image
    net, flow = backbone("lite0"), FlowZ(make_flow(192, 256))
    xs = [np.zeros((1, 3, 256 >> s, 256 >> s), np.float32) for s in range(3)]
    nets = [runner(net, [x]) for x in xs]
    fz = runner(flow, [np.zeros((batch, 192, 8 >> i, 8 >> i), np.float32) for i in range(3)])

    def run():
        levels, sizes = [[], [], []], []
        for _ in range(batch):
            img = Image.open(image).convert("RGB")
            sizes.append(img.size)
            for level, r, p in zip(levels, nets, pyramid(img, 256, 256)):
                level.append(r(p.numpy())[0])
        z = [torch.from_numpy(t) for t in fz(*[np.concatenate(level) for level in levels])]
        out = []
        for i, (w, h) in enumerate(sizes):
            zi = [t[i:i + 1] for t in z]
            m = F.interpolate(zi[0].pow(2).mean(1, keepdim=True), size=(h, w), mode="bilinear", align_corners=False)
            out.append((score(zi), m))
        return out
    return timed(run) / batch


work = {
    "flow-forward-paper": lambda: flow_workload(304, 1024, 1, 24),
    "flow-forward-cpu": lambda: flow_workload(192, 256, 16, 8),
    "flow-step-paper": lambda: step_workload(304, 1024, 2, 24),
    "flow-step-cpu": lambda: step_workload(192, 256, 16, 8),
    "lite0-256": lambda: extraction_workload("lite0", 256),
    "lite0-256-level0": lambda: extraction_workload("lite0", 256, [0]),
    "lite0-256-level1": lambda: extraction_workload("lite0", 256, [1]),
    "lite0-256-level2": lambda: extraction_workload("lite0", 256, [2]),
    "b5-768": lambda: extraction_workload("b5", 768),
    "b5-768-level0": lambda: extraction_workload("b5", 768, [0]),
    "b5-768-level1": lambda: extraction_workload("b5", 768, [1]),
    "b5-768-level2": lambda: extraction_workload("b5", 768, [2]),
    "predict": predict_workload,
    # csflow's PREDICT_BATCH (crates/csflow/benches/workloads.rs).
    "predict-batch": lambda: predict_workload(8),
}
if engine.startswith("openvino") and "step" in workload:
    sys.exit(3)  # no training in OpenVINO
if workload.endswith("-bf16"):
    # csflow's bfloat16 rows: OpenVINO's default (bf16 on CPUs with AVX512_BF16), nothing in PyTorch.
    if engine != "openvino":
        sys.exit(3)
    workload = workload.removesuffix("-bf16")
print(json.dumps({"median": work[workload](), "torch": torch.__version__}))
