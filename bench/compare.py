"""One table: csflow against PyTorch and OpenVINO (its default precision, and f32) on the same workloads, same
thread count, each run in a fresh process (medians; peak resident memory of that process from wait4). Run from the repository root after
scripts/setup.sh, with a Python that has torch, efficientnet_pytorch, efficientnet-lite-pytorch, openvino, onnx:

    python bench/compare.py [--quick] [--rounds N] [--only WORKLOAD[,WORKLOAD...]]

With --rounds N (default 1) every engine runs each workload N times, the engines interleaved, and the table
keeps each engine's lowest median: on a shared VM whose speed drifts by 25 % or more between minutes, the
best of interleaved rounds compares the engines at the same machine state more often than one run does.

The Rust side is crates/csflow/benches/workloads.rs, the Python side bench/workloads.py.
"""
import json
import os
import platform
import subprocess
import sys

QUICK = "--quick" in sys.argv
ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 1
# Some rows again (a row of a noisy run, more rounds): workload names as in WORKLOADS.
ONLY = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
# (workload, what, reps)
WORKLOADS = [
    ("flow-forward-paper", "flow forward, paper size (C 304, hidden 1024, 24/12/6), batch 1", 3),
    ("flow-forward-paper-bf16", "the same, csflow --precision bf16 (3x3 and stride-2 layers in bfloat16, 5x5 weights in f16; f32 without AVX512_BF16)", 3),
    ("flow-step-paper", "flow training step, paper size, batch 2", 2),
    ("flow-forward-cpu", "flow forward, CPU size (C 192, hidden 256, 8/4/2), batch 16", 5),
    ("flow-forward-cpu-bf16", "the same, csflow --precision bf16", 5),
    ("flow-step-cpu", "flow training step, CPU size, batch 16", 3),
    ("b5-768", "EfficientNet-B5 to block 35, 768 px, 3 scales, batch 1", 2),
    ("lite0-256", "EfficientNet-Lite0 to block 14, 256 px, 3 scales, batch 1", 10),
    ("predict", "predict end to end: 512 px PNG -> score + full-size map (Lite0 256 px, CPU-size flow)", 10),
    ("predict-bf16", "the same, csflow --precision bf16 (flow only; the backbone stays f32)", 10),
    ("predict-batch", "predict on a folder, per image: the flow on 8 images at once (csflow --batch-size 8)", 5),
]
# OpenVINO twice: its default (bfloat16 on CPUs with AVX512_BF16), and with float32 asked for, the precision
# at which its scores match PyTorch's (bench/engine_accuracy.py: the default moved a trained model's by 1e-2 to
# 3e-2, csflow's --precision bf16 by at most 3e-4).
ENGINES = ["csflow", "pytorch", "openvino", "openvino-f32"]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_binary():
    out = subprocess.run(
        ["cargo", "bench", "-p", "csflow", "--bench", "workloads", "--no-run", "--message-format=json"],
        cwd=root, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and "workloads" in msg["executable"]:
            return msg["executable"]
    raise SystemExit("could not find the workloads bench binary")


def run(cmd):
    """(median seconds or None, peak RSS in MiB) of one fresh process."""
    p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "RAYON_NUM_THREADS": "2", "THREADS": "2", "OMP_NUM_THREADS": "2"})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / 1024
    if p.returncode != 0:
        return None, rss
    return json.loads(out.strip().splitlines()[-1])["median"], rss


def main():
    exe = bench_binary()
    # Versions from a child process: importing torch here would raise this process's resident memory, and a
    # forked child's peak (wait4's ru_maxrss) starts from its parent's.
    versions = subprocess.run(
        [sys.executable, "-c", "import torch\ntry:\n import openvino as o; v=o.__version__.split('-')[0]\n"
         " p=o.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()\n"
         "except ImportError:\n v=p=''\nprint(torch.__version__, v, p)"],
        capture_output=True, text=True, check=True).stdout.split()
    torch_version, ov = versions[0], (versions[1] if len(versions) > 1 else None)
    ov_precision = versions[2] if len(versions) > 2 else "?"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()}; 2 threads everywhere")
    version = open(os.path.join(root, "Cargo.toml")).read().split('version = "')[1].split('"')[0]
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16") if f in open("/proc/cpuinfo").read().split()]
    print(f"PyTorch {torch_version} (FP32), OpenVINO {ov} (ONNX opset 17, default settings: inference precision "
          f"{ov_precision} on this CPU), csflow {version}; CPU flags {' '.join(flags)}; best median of {ROUNDS} "
          "interleaved round(s)")
    rows = []
    for i, (w, what, reps) in enumerate(WORKLOADS):
        if ONLY is not None and w not in ONLY:
            continue
        reps = 1 if QUICK else reps
        results = {}
        for round_ in range(ROUNDS):
            # Rotate the engine order per workload and round, so drifts of the machine's speed favour none.
            k = (i + round_) % len(ENGINES)
            for e in ENGINES[k:] + ENGINES[:k]:
                if e == "csflow":
                    cmd = [exe, w, str(reps)]
                else:
                    if e.startswith("openvino") and (ov is None or "step" in w):
                        continue
                    if e != "openvino" and w.endswith("-bf16"):
                        continue
                    cmd = [sys.executable, os.path.join(root, "bench", "workloads.py"), e, w, str(reps)]
                t, rss = run(cmd)
                print(f"  {w:<20} {e:<12} {t or float('nan'):8.3f} s  {rss:7.0f} MiB", file=sys.stderr)
                best, peak = results.get(e, (None, 0.0))
                if t is not None and (best is None or t < best):
                    best = t
                results[e] = (best, max(peak, rss))
        rows.append((w, what, results))

    def cell(r):
        # Three decimals, four below 0.1 s (Lite0's 3-5 ms would read as one or two digits).
        return "—" if r is None or r[0] is None else f"{r[0]:.3f}" if r[0] >= 0.1 else f"{r[0]:.4f}"

    def ratio(a, b):
        if a is None or b is None or a[0] is None or b[0] is None:
            return "—"
        return f"{a[0] / b[0]:.2f}x"

    def mem(r):
        return "—" if r is None else f"{r[1]:.0f}"

    print()
    print("| workload | csflow s | PyTorch s | OpenVINO s | OpenVINO f32 s | csflow/PyTorch | csflow/OpenVINO | "
          "csflow/OpenVINO f32 | peak MiB csflow / PyTorch / OpenVINO / OpenVINO f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for w, what, r in rows:
        c, p, o, f = r.get("csflow"), r.get("pytorch"), r.get("openvino"), r.get("openvino-f32")
        print(f"| {what} | {cell(c)} | {cell(p)} | {cell(o)} | {cell(f)} | {ratio(c, p)} | {ratio(c, o)} | "
              f"{ratio(c, f)} | {mem(c)} / {mem(p)} / {mem(o)} / {mem(f)} |")
    by_name = dict((w, r) for w, _, r in rows)
    for w, what in [("predict", "one image at a time"), ("predict-batch", "a folder in batches of 8")]:
        pr = by_name.get(w, {})
        print(f"\npredict throughput, {what}: " + ", ".join(
            f"{e} {1 / pr[e][0]:.1f} images/s" for e in ENGINES if pr.get(e) and pr[e][0]))


if __name__ == "__main__":
    main()
