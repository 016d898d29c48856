"""PyTorch side of crates/csflow/benches/flow_step.rs: flow forward and training step, medians.

    python bench/flow_step.py [paper|cpu] [batch] [reps]
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import csflow_ref as ref  # noqa: E402

size = sys.argv[1] if len(sys.argv) > 1 else "paper"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
c, hidden, m = (304, 1024, 24) if size == "paper" else (192, 256, 8)
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
flow = ref.Flow(c, hidden)
with torch.no_grad():
    for n, p in flow.named_parameters():
        if "gamma" in n:
            p.fill_(0.1)
x = [torch.randn(batch, c, m // 2**i, m // 2**i) for i in range(3)]
fwd = []
for _ in range(reps + 1):
    t = time.perf_counter()
    with torch.no_grad():
        flow(x)
    fwd.append(time.perf_counter() - t)
opt = ref.make_adam(flow, 2e-4)
step = []
for _ in range(reps + 1):
    t = time.perf_counter()
    ref.train_step(flow, opt, x)
    step.append(time.perf_counter() - t)
print(f"pytorch {torch.__version__} {size} C={c} hidden={hidden} maps {m}/{m//2}/{m//4} batch {batch} threads "
      f"{torch.get_num_threads()}: forward {statistics.median(fwd[1:]):.3f} s, train step "
      f"{statistics.median(step[1:]):.3f} s (median of {reps})")
