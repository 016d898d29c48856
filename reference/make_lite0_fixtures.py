"""Real-weight fixture: EfficientNet-Lite0 ImageNet logits for scikit-image's chelsea.png and coffee.png
(assets/ from scripts/setup.sh), preprocessed as csflow does: PIL bilinear resize to 224x224, [0, 1],
ImageNet mean/std normalisation.

    python reference/make_lite0_fixtures.py
"""
import os

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from safetensors.numpy import save_file

os.makedirs(os.path.join(os.path.dirname(__file__), '..', 'crates', 'csflow', 'tests', 'fixtures', 'images'), exist_ok=True)

ROOT = os.path.join(os.path.dirname(__file__), "..")
ASSETS = os.path.join(ROOT, "assets")
FIX = os.path.join(ROOT, "crates", "csflow", "tests", "fixtures")
OUT = os.path.join(FIX, "lite0_real_logits.safetensors")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

torch.set_num_threads(2)
model = EfficientNet.from_name("efficientnet-lite0")
state = torch.load(os.path.join(ASSETS, "efficientnet-lite0-57934424.pth"), map_location="cpu", weights_only=True)
model.load_state_dict(state)
model.eval()
out = {}
for name in ("chelsea", "coffee"):
    img = Image.open(os.path.join(ASSETS, f"{name}.png")).convert("RGB").resize((224, 224), Image.BILINEAR)
    img.save(os.path.join(FIX, "images", f"{name}_224_pil.png"))  # the network input, without resize differences
    x = (np.asarray(img, dtype=np.float32) / np.float32(255.0) - MEAN) / STD
    x = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        logits = model(x)
    out[name] = logits.numpy()
    print(name, "top-5", torch.topk(logits, 5).indices.tolist())
save_file(out, OUT)

# PIL resize results, down and up, for the resize parity test (sources: assets/).
for name, size, crop in [("chelsea", (224, 224), None), ("coffee", (256, 384), None), ("brick", (256, 256), None),
                         ("grass", (384, 256), None), ("gravel", (256, 256), (100, 60, 196, 140))]:
    img = Image.open(os.path.join(ASSETS, f"{name}.png")).convert("RGB")
    if crop:
        img = img.crop(crop)
    w, h = size
    img.resize((w, h), Image.BILINEAR).save(os.path.join(FIX, "images", f"resize_{name}_{h}x{w}.png"))
# chelsea_224_pil.png (above) doubles as the resize case for chelsea, 224x224.
