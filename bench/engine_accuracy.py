"""How far each engine's arithmetic moves a trained model's scores: a csflow model file (Lite0 backbone,
written by `csflow fit --data`, e.g. scripts/demo.sh's demo-out/brick.safetensors) loaded into the PyTorch
reference (reference/csflow_ref.py) and the same modules exported to ONNX for OpenVINO, run on its default
precision (bfloat16 on CPUs with AVX512_BF16) and with f32 asked for; each image's score against PyTorch's
float32 score, and so are the scores of `csflow predict` JSON-lines outputs given as LABEL=FILE.

    python bench/engine_accuracy.py <model.safetensors> <image folder> [LABEL=predict.jsonl ...]
"""
import copy
import glob
import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import csflow_ref as ref  # noqa: E402
from modules import FlowZ, Tap, pyramid, score  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
model_path, folder = sys.argv[1], sys.argv[2]
given = {}
for arg in sys.argv[3:]:
    label, _, path = arg.partition("=")
    given[label] = {os.path.abspath(r["path"]): r["score"] for r in map(json.loads, open(path))}

with safe_open(model_path, "pt") as f:
    meta = json.loads(f.metadata()["csflow"])
    tensors = {k: f.get_tensor(k) for k in f.keys()}
bb = meta["backbone"]
if bb["name"] != "efficientnet-lite0":
    sys.exit(f"{model_path}: backbone {bb['name']}, this script reads Lite0 models")
from efficientnet_lite_pytorch import EfficientNet as Lite  # noqa: E402

net = Lite.from_name("efficientnet-lite0")
net.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")},
                    strict=False)
fc = meta["flow"]
flow = ref.Flow(fc["channels"], fc["hidden"], tuple(fc["kernel_sizes"])).eval()
flow.load_state_dict({k: v for k, v in tensors.items() if k.startswith("module_list.")}, strict=True)


h, w = bb["input_size"]
tap, fz = Tap(net, bb["block"], True), FlowZ(flow)


def torch_score(pyr):
    with torch.no_grad():
        return score(fz(*[tap(p) for p in pyr]))


def openvino_runner(hint):
    """Exports copies: tracing left the modules themselves computing other values afterwards."""
    import openvino as ov
    tap_c, fz_c = copy.deepcopy(tap), copy.deepcopy(fz)
    core = ov.Core()
    cfg = {} if hint is None else {"INFERENCE_PRECISION_HINT": hint}
    nets = []
    with tempfile.TemporaryDirectory() as d:
        for s in range(3):
            path = os.path.join(d, f"tap{s}.onnx")
            torch.onnx.export(tap_c, (torch.zeros(1, 3, h >> s, w >> s),), path, dynamo=False, opset_version=17)
            nets.append(core.compile_model(path, "CPU", cfg))
        shapes = [tuple(tap_c(torch.zeros(1, 3, h >> s, w >> s)).shape) for s in range(3)]
        path = os.path.join(d, "flow.onnx")
        torch.onnx.export(fz_c, tuple(torch.zeros(s) for s in shapes), path, dynamo=False, opset_version=17)
        flow_c = core.compile_model(path, "CPU", cfg)
    precision = flow_c.get_property("INFERENCE_PRECISION_HINT")

    def run(pyr):
        feats = [list(n([p.numpy()]).values())[0] for n, p in zip(nets, pyr)]
        return score(flow_c(feats).values())
    return run, precision.get_type_name()


images = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                if p.lower().endswith((".png", ".jpg", ".jpeg")))
if not images:
    sys.exit(f"{folder}: no images")
engines = {"openvino default": openvino_runner(None), "openvino f32": openvino_runner("f32")}
defective = [os.sep + "good" + os.sep not in p for p in images]


def auroc(scores):
    """Image AUROC with the images under a `good` folder as negatives (ties count half)."""
    pos = [s for s, d in zip(scores, defective) if d]
    neg = [s for s, d in zip(scores, defective) if not d]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


scores = {name: [] for name in ["pytorch f32"] + list(given) + list(engines)}
for path in images:
    pyr = pyramid(Image.open(path).convert("RGB"), h, w)
    scores["pytorch f32"].append(torch_score(pyr))
    for label, by_path in given.items():
        scores[label].append(by_path.get(os.path.abspath(path), float("nan")))
    for name, (run, _) in engines.items():
        scores[name].append(run(pyr))
want = np.array(scores["pytorch f32"])
print(f"{len(images)} images ({model_path}): each score against PyTorch's float32 score, and the image AUROC")
for name, got in scores.items():
    errs = np.abs(np.array(got) - want) / np.abs(want)
    what = f"OpenVINO, inference precision {engines[name][1]}" if name in engines else ""
    print(f"{name:18s} relative difference max {np.nanmax(errs):.2e}, mean {np.nanmean(errs):.2e}, "
          f"AUROC {auroc(got):.4f}  {what}")
