"""CS-Flow reference in PyTorch, written from ../shared/SPEC.md sections 1.2-1.4 (not from the authors' code).

It exists only to make the parity fixtures under tests/fixtures; csflow itself never needs Python.
Parameter names follow the authors' state_dict (`module_list.{4 + 2k}.s{1,2}.<conv>.weight`).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLAMP = 3.0
KERNELS = (3, 3, 3, 5)
CONVS = ("conv_scale0_0", "conv_scale1_0", "conv_scale2_0", "conv_scale0_1", "conv_scale1_1",
         "conv_scale2_1", "up_conv10", "up_conv21", "down_conv01", "down_conv12")


def numpy_perms(c, seed, n_scales=3):
    """The channel permutations of flow block `seed`: successive numpy legacy draws."""
    np.random.seed(seed)
    return [np.random.permutation(c) for _ in range(n_scales)]


class CrossConv(nn.Module):
    def __init__(self, c_in, c_out, hidden, k):
        super().__init__()
        p = k // 2
        for g in ("gamma0", "gamma1", "gamma2"):
            setattr(self, g, nn.Parameter(torch.zeros(1)))
        for i in range(3):
            setattr(self, f"conv_scale{i}_0", nn.Conv2d(c_in, hidden, k, padding=p))
            setattr(self, f"conv_scale{i}_1", nn.Conv2d(hidden, c_out, k, padding=p))
        self.up_conv10 = nn.Conv2d(hidden, c_out, k, padding=p)
        self.up_conv21 = nn.Conv2d(hidden, c_out, k, padding=p)
        self.down_conv01 = nn.Conv2d(hidden, c_out, k, padding=p, stride=2)
        self.down_conv12 = nn.Conv2d(hidden, c_out, k, padding=p, stride=2)

    def forward(self, x):
        h = [F.leaky_relu(getattr(self, f"conv_scale{i}_0")(x[i]), 0.1) for i in range(3)]
        o = [getattr(self, f"conv_scale{i}_1")(h[i]) for i in range(3)]
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        o0 = o[0] + self.up_conv10(up(h[1]))
        o1 = o[1] + self.down_conv01(h[0]) + self.up_conv21(up(h[2]))
        o2 = o[2] + self.down_conv12(h[1])
        return [o0 * self.gamma0, o1 * self.gamma1, o2 * self.gamma2]


def log_e(s):
    return CLAMP * 0.636 * torch.atan(s / CLAMP)


class Coupling(nn.Module):
    def __init__(self, c, hidden, k):
        super().__init__()
        self.half = c // 2
        self.s1 = CrossConv(self.half, c, hidden, k)
        self.s2 = CrossConv(self.half, c, hidden, k)

    def forward(self, x):
        h = self.half
        x1 = [t[:, :h] for t in x]
        x2 = [t[:, h:] for t in x]
        r = self.s2(x2)
        s, t = [a[:, :h] for a in r], [a[:, h:] for a in r]
        y1 = [torch.exp(log_e(s[i])) * x1[i] + t[i] for i in range(3)]
        r2 = self.s1(y1)
        s2, t2 = [a[:, :h] for a in r2], [a[:, h:] for a in r2]
        y2 = [torch.exp(log_e(s2[i])) * x2[i] + t2[i] for i in range(3)]
        out = [torch.clamp(torch.cat([y1[i], y2[i]], 1), -1e6, 1e6) for i in range(3)]
        jac = [log_e(s[i]).sum((1, 2, 3)) + log_e(s2[i]).sum((1, 2, 3)) for i in range(3)]
        return out, jac


class Flow(nn.Module):
    def __init__(self, c, hidden, kernels=KERNELS):
        super().__init__()
        mods = []
        self.perms = []
        for k, ks in enumerate(kernels):
            mods.append(nn.Identity())  # the permutation node (no parameters)
            mods.append(Coupling(c, hidden, ks))
            self.perms.append([torch.as_tensor(p) for p in numpy_perms(c, k)])
        # indices 0..2 are the authors' input nodes: coupling block k lands at module_list.{4 + 2k}
        self.module_list = nn.ModuleList([nn.Identity()] * 3 + mods)

    def forward(self, x):
        logdet = 0
        for k in range(len(self.perms)):
            x = [x[i][:, self.perms[k][i]] for i in range(3)]
            x, jac = self.module_list[4 + 2 * k](x)
            logdet = logdet + torch.stack(jac, 1)
        return x, logdet  # logdet: [B, 3]


def loss_fn(z, logdet):
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in z], 1)
    return torch.mean(0.5 * (flat ** 2).sum(1) - logdet.sum(1)) / flat.shape[1]


def scores(z):
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in z], 1)
    return (flat ** 2).mean(1) / 2


def maps(z, size):
    """Per-scale anomaly maps upsampled to `size`: (scale-0 map, product of the three)."""
    m = [(t ** 2).mean(1, keepdim=True) for t in z]
    up = [F.interpolate(a, size=size, mode="bilinear", align_corners=False)[:, 0] for a in m]
    return [a[:, 0] for a in m], up[0], up[0] * up[1] * up[2]


def make_adam(flow, lr):
    return torch.optim.Adam(flow.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-4, weight_decay=1e-5)


def train_step(flow, opt, x):
    opt.zero_grad()
    z, logdet = flow(x)
    loss = loss_fn(z, logdet)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
    opt.step()
    return loss.item(), norm.item()


# --- seeded formula weights, computed identically by the Rust tests (tests/common/formula.rs) ---
M64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix64(x):
    """Vectorised splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def formula_uniform(name, n, seed):
    """n values in (-1, 1) with 24-bit resolution, exact in f32."""
    key = np.uint64((fnv1a64(name) ^ seed) & M64)
    with np.errstate(over="ignore"):
        r = splitmix64(key + np.arange(n, dtype=np.uint64))
    u = (r >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    return np.float32(2.0) * u - np.float32(1.0)


def formula_bound(name, shape):
    """Like PyTorch's default conv init range: 1/sqrt(fan_in); gammas in (-1, 1)."""
    if name.endswith(("gamma0", "gamma1", "gamma2")):
        return 1.0
    return 1.0 / math.sqrt(shape[1] * shape[2] * shape[3]) if len(shape) == 4 else None


def formula_state(flow, seed):
    sd = {}
    weights = {n: p for n, p in flow.state_dict().items()}
    for name, p in weights.items():
        if name.endswith(".bias"):
            w = weights[name[:-5] + ".weight"]
            bound = formula_bound(name[:-5] + ".weight", w.shape)
        else:
            bound = formula_bound(name, p.shape)
        vals = formula_uniform(name, p.numel(), seed) * np.float32(bound)
        sd[name] = torch.from_numpy(vals.astype(np.float32)).reshape(p.shape)
    return sd
