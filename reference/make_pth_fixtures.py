"""Writes the PyTorch checkpoint fixtures of crates/csflow/tests/pth_reader.rs (run from the repository root):

    python reference/make_pth_fixtures.py

Needs torch, numpy and safetensors (a virtual environment outside the repository). Writes into
crates/csflow/tests/fixtures/pth/:

- state_zip.pth, state_legacy.pth: one small state dict (conv + batch norm, plus non-contiguous, offset,
  shared-storage, f16/bf16/f64, integer, bool, scalar, empty, expanded and Parameter tensors) saved in the zip
  format of torch >= 1.6 and in the legacy pre-zip format.
- state_proto4.pth: the same in the zip format with pickle protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL ...).
- state_deflate.pth: state_zip.pth re-packed with deflate-compressed entries.
- checkpoint_zip.pth: {"state_dict": state, "epoch": 3, ...}; checkpoint_model_legacy.pth: {"model": state, ...}.
- nested_zip.pth: nested dicts of tensors (names are flattened with '.').
- malicious_zip.pth, malicious_legacy.pth: pickles that reference os.system / builtins.eval. They are only
  written as bytes here, never loaded or executed.
- out_of_bounds_legacy.pth: a tensor whose size and stride reach past the end of its storage.
- view_legacy.pth: a storage view as torch < 1.0 wrote them (persistent id with view metadata).
- expected.safetensors: the expected contiguous f32 values (state dict names; nested ones as "nested:NAME").
"""
import collections
import io
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import torch
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "csflow", "tests", "fixtures", "pth")
MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))


def state_dict():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m.train()
    m(torch.randn(2, 3, 6, 6))  # running statistics and num_batches_tracked become non-trivial
    sd = m.state_dict()
    base = torch.arange(24, dtype=torch.float32) * 0.5 - 3.0
    sd["extra.base"] = base
    sd["extra.view"] = base[6:18].view(3, 4)  # shares base's storage, offset 6
    sd["extra.transposed"] = torch.randn(3, 5).t()  # stride (1, 5)
    sd["extra.sliced"] = torch.randn(4, 6)[1:, ::2]  # offset 6, stride (6, 2)
    sd["extra.permuted"] = torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1)
    sd["extra.expanded"] = torch.randn(3, 1).expand(3, 4)  # stride 0
    sd["extra.half"] = torch.tensor([1.0, -2.5, 65504.0, 6e-8, -0.0, float("inf"), 1e-5, 0.1], dtype=torch.float16)
    sd["extra.half_t"] = torch.randn(4, 3).half().t()
    sd["extra.bf16"] = torch.randn(5).to(torch.bfloat16)
    sd["extra.f64"] = torch.randn(2, 3, dtype=torch.float64)
    sd["extra.int32"] = torch.tensor([-3, 0, 7, 1 << 20], dtype=torch.int32)
    sd["extra.uint8"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    sd["extra.int8"] = torch.tensor([-128, 5, 127], dtype=torch.int8)
    sd["extra.bool"] = torch.tensor([True, False, True])
    sd["extra.scalar"] = torch.tensor(2.5)
    sd["extra.empty"] = torch.zeros(0, 3)
    sd["extra.param"] = torch.nn.Parameter(torch.randn(2, 2))  # pickled through _rebuild_parameter
    return sd


def expected(tensors, prefix=""):
    return {prefix + k: v.detach().to(torch.float32).contiguous().numpy() for k, v in tensors.items()}


def legacy_header():
    return b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC, 1001, LEGACY_SYS_INFO))


def write_torch_zip(path, pickle_bytes):
    """A zip laid out as torch writes it: archive/data.pkl, archive/byteorder, stored entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def malicious_pickle_global():
    """`os.system('echo pwned')` through GLOBAL + REDUCE, spelled out opcode by opcode (never loaded)."""
    cmd = b"echo pwned"
    return b"\x80\x02" + b"cos\nsystem\n" + b"X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."


def malicious_pickle_stack_global():
    """`builtins.eval('1+1')` through STACK_GLOBAL (protocol 4) inside a dict value (never loaded)."""

    def s(text):
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b

    return b"\x80\x04}" + s("weight") + s("builtins") + s("eval") + b"\x93" + s("1+1") + b"\x85R" + b"s."


class _FakeStorage:
    pass


class _FakeTensor:
    """Pickles as `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, whatever those are."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def legacy_by_hand(numel, view, offset, size, stride):
    """A legacy file with one f32 storage `arange(numel)` and one tensor `weight`, written opcode by opcode
    by pickle itself: `view` is old torch's view metadata (view_key, offset, length) or None."""
    storage = _FakeStorage()
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda obj: ("storage", torch.FloatStorage, "0", "cpu", numel, view) if obj is storage else None
    p.dump(collections.OrderedDict(weight=_FakeTensor(storage, offset, size, stride)))
    data = np.arange(numel, dtype="<f4").tobytes()
    return legacy_header() + buf.getvalue() + pickle.dumps(["0"], protocol=2) + struct.pack("<q", numel) + data


def main():
    os.makedirs(OUT, exist_ok=True)
    out = lambda name: os.path.join(OUT, name)  # noqa: E731
    sd = state_dict()
    torch.save(sd, out("state_zip.pth"))
    torch.save(sd, out("state_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(sd, out("state_proto4.pth"), pickle_protocol=4)
    with zipfile.ZipFile(out("state_zip.pth")) as src, zipfile.ZipFile(out("state_deflate.pth"), "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    optimizer_state = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"state_dict": sd, "epoch": 3, "optimizer": optimizer_state}, out("checkpoint_zip.pth"))
    torch.save({"model": sd, "epoch": 3, "best": 0.5}, out("checkpoint_model_legacy.pth"),
               _use_new_zipfile_serialization=False)
    g = torch.Generator().manual_seed(1)
    nested = {"backbone": {"conv": {"weight": torch.randn(2, 3, generator=g)}, "scale": torch.randn(3, generator=g)},
              "head.bias": torch.randn(2, generator=g), "epoch": 3, "name": "tiny"}
    torch.save(nested, out("nested_zip.pth"))
    flat_nested = {"backbone.conv.weight": nested["backbone"]["conv"]["weight"],
                   "backbone.scale": nested["backbone"]["scale"], "head.bias": nested["head.bias"]}
    write_torch_zip(out("malicious_zip.pth"), malicious_pickle_global())
    with open(out("malicious_legacy.pth"), "wb") as f:
        f.write(legacy_header() + malicious_pickle_stack_global())
    with open(out("out_of_bounds_legacy.pth"), "wb") as f:
        f.write(legacy_by_hand(4, None, 0, (10,), (1,)))
    # Root storage arange(10); the view covers elements 2..8; the tensor is its [3, 2] transpose from 1.
    with open(out("view_legacy.pth"), "wb") as f:
        f.write(legacy_by_hand(10, ("1", 2, 6), 1, (2, 2), (1, 2)))
    view_expected = {"view:weight": np.array([[3, 5], [4, 6]], dtype=np.float32)}
    save_file({**expected(sd), **expected(flat_nested, "nested:"), **view_expected}, out("expected.safetensors"))
    total = sum(os.path.getsize(out(n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
