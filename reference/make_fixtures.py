"""Writes the flow parity fixtures in tests/fixtures (run from the repository root):

    python reference/make_fixtures.py

Needs torch, numpy and safetensors (a virtual environment outside the repository). Weights come from the
seeded formula in csflow_ref.py, which the Rust tests compute too, so only inputs and outputs are stored.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
import csflow_ref as ref  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "csflow", "tests", "fixtures")
torch.set_num_threads(2)


def np32(t):
    return t.detach().cpu().contiguous().numpy().astype(np.float32)


def sample_index(name, n, count=64):
    """Indices of the gradient entries a large fixture stores (the Rust test derives the same)."""
    key = np.uint64(ref.fnv1a64("sample:" + name))
    with np.errstate(over="ignore"):
        r = ref.splitmix64(key + np.arange(count, dtype=np.uint64))
    return (r % np.uint64(n)).astype(np.int64)


def perms():
    out = {}
    for c in (2, 7, 16, 32, 192, 304, 1000):
        for seed in range(4):
            for i, p in enumerate(ref.numpy_perms(c, seed)):
                out[f"c{c}_seed{seed}_scale{i}"] = p.astype(np.int64)
    # Legacy MT19937 raw output after seed(5489), the generator's own reference value.
    rs = np.random.RandomState(5489)
    out["mt_5489_first8"] = rs.randint(0, 2**32, size=8, dtype=np.uint32).astype(np.int64)
    save_file(out, os.path.join(OUT, "permutations.safetensors"))


def flow_case(name, c, hidden, maps, batch, seed, full, image_size, input_scale=1.0):
    torch.manual_seed(seed)
    flow = ref.Flow(c, hidden)
    flow.load_state_dict(ref.formula_state(flow, seed))
    g = torch.Generator().manual_seed(seed + 1)
    x = [input_scale * torch.randn(batch, c, m, m, generator=g) for m in maps]
    xs = [t.clone() for t in x]

    z, logdet = flow(x)
    loss = ref.loss_fn(z, logdet)
    loss.backward()
    score = ref.scores(z)
    m0, up0, prod = ref.maps(z, image_size)
    out = {f"x{i}": np32(xs[i]) for i in range(3)}
    out.update({f"z{i}": np32(z[i]) for i in range(3)})
    out.update({"logdet": np32(logdet), "loss": np32(loss.reshape(1)), "score": np32(score),
                "map0": np32(m0[0]), "map1": np32(m0[1]), "map2": np32(m0[2]),
                "map_up0": np32(up0), "map_prod": np32(prod)})
    for pn, p in flow.named_parameters():
        gr = np32(p.grad).reshape(-1)
        if full:
            out["grad." + pn] = np32(p.grad)
        else:
            idx = sample_index(pn, gr.size)
            out["gradsample." + pn] = gr[idx]
            out["gradnorm." + pn] = np.array([np.linalg.norm(gr.astype(np.float64))], dtype=np.float32)

    # Three Adam steps with clipping, on the same batch.
    opt = ref.make_adam(flow, 2e-4)
    losses, norms = [], []
    for _ in range(3):
        l, n = ref.train_step(flow, opt, [t.clone() for t in xs])
        losses.append(l)
        norms.append(n)
    out["step_losses"] = np.array(losses, dtype=np.float32)
    out["step_gradnorms"] = np.array(norms, dtype=np.float32)
    for pn, p in flow.named_parameters():
        v = np32(p).reshape(-1)
        if full:
            out["after." + pn] = np32(p)
        else:
            idx = sample_index(pn, v.size)
            out["aftersample." + pn] = v[idx]
    meta = {"c": str(c), "hidden": str(hidden), "maps": json.dumps(maps), "batch": str(batch),
            "seed": str(seed), "image_size": json.dumps(image_size)}
    save_file(out, os.path.join(OUT, f"flow_{name}.safetensors"), metadata=meta)
    print(name, "loss", loss.item(), "grad norms", norms)


def training_case():
    """Features files and the scores that `csflow fit --init` then `csflow predict` must reproduce."""
    c, hidden, maps, seed = 16, 16, [8, 4, 2], 7
    n_train, n_test, epochs, batch, lr, shuffle_seed = 10, 6, 4, 4, 1e-3, 3
    flow = ref.Flow(c, hidden)
    flow.load_state_dict(ref.formula_state(flow, seed))
    # The starting weights as the authors' code would export them: a bare state_dict, no csflow metadata.
    save_file({k: np32(v) for k, v in flow.state_dict().items()}, os.path.join(OUT, "training_init.safetensors"))
    g = torch.Generator().manual_seed(123)
    train = [torch.randn(n_train, c, m, m, generator=g) for m in maps]
    test = [torch.randn(n_test, c, m, m, generator=g) for m in maps]
    test[0][n_test // 2:, :, 2:5, 3:6] += 3.0  # the second half carries a local defect
    labels = [0] * (n_test // 2) + [1] * (n_test - n_test // 2)

    opt = ref.make_adam(flow, lr)
    rs = np.random.RandomState(shuffle_seed)
    losses = []
    for _ in range(epochs):
        order = rs.permutation(n_train)
        total = 0.0
        for b in range(0, n_train, batch):
            idx = torch.as_tensor(order[b:b + batch])
            l, _ = ref.train_step(flow, opt, [t[idx] for t in train])
            total += l * len(idx)
        losses.append(total / n_train)
    with torch.no_grad():
        z, _ = flow(test)
        score = ref.scores(z)

    paths = [f"train/{i:03}.png" for i in range(n_train)]
    save_file({f"scale_{i}": np32(train[i]) for i in range(3)}, os.path.join(OUT, "train_features.safetensors"),
              metadata={"paths": json.dumps(paths)})
    tpaths = [f"test/{i:03}.png" for i in range(n_test)]
    save_file({f"scale_{i}": np32(test[i]) for i in range(3)}, os.path.join(OUT, "test_features.safetensors"),
              metadata={"paths": json.dumps(tpaths), "labels": json.dumps(labels)})
    save_file({"score": np32(score), "epoch_losses": np.array(losses, dtype=np.float32)},
              os.path.join(OUT, "training_expected.safetensors"),
              metadata={"c": str(c), "hidden": str(hidden), "formula_seed": str(seed), "epochs": str(epochs),
                        "batch": str(batch), "lr": repr(lr), "shuffle_seed": str(shuffle_seed)})
    print("training losses", losses, "scores", score.tolist())


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    perms()
    flow_case("small", c=16, hidden=32, maps=[8, 4, 2], batch=2, seed=1, full=True, image_size=[37, 53])
    flow_case("paper_maps", c=32, hidden=64, maps=[24, 12, 6], batch=2, seed=2, full=False, image_size=[100, 100],
              input_scale=2.0)  # larger inputs: gradient norm above 1, so clipping acts
    training_case()
