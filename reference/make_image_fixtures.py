"""Writes the image decoding and preprocessing fixtures of crates/csflow/tests/images.rs (run from the
repository root):

    python reference/make_image_fixtures.py

Needs numpy, torch, safetensors, Pillow, tifffile and scikit-image (only for its bundled CC0 photos:
chelsea, coffee and the textures brick, grass, gravel). Writes into crates/csflow/tests/fixtures/images/parity/:

- Test inputs, small crops of the photos in every format and mode csflow reads: PNG (RGB, RGBA, palette with
  transparency, L, LA, 1-bit, 16-bit L/LA/RGB/RGBA), JPEG (4:2:0, 4:4:4, gray, progressive), BMP (24-bit,
  8-bit gray, 32-bit RGBA), TIFF (raw RGB, LZW gray, deflate RGBA, 16-bit gray and RGB), WebP (lossless RGB and RGBA,
  lossy).
- Broken inputs: truncated and garbage PNG, text named .jpg, a GIF (a format csflow does not read), and
  PNG / BMP / JPEG / TIFF headers that declare 60000 x 60000 (or 65000 x 65000) pixels.
- expected.safetensors:
  * `pil.<file>`: PIL's `Image.open(file).convert("RGB")`, [H, W, 3] u8 ([H, W, 1] when R = G = B, to keep the
    file small). Decoders that give the same pixels share one tensor (metadata `decode` maps file -> key).
  * `want.<file>`: where csflow deliberately differs from PIL (16-bit gray: PIL clips at 255, csflow keeps the
    high byte as PIL itself does for 16-bit RGB, RGBA and LA).
  * `resize.<src>.<H>x<W>`: PIL's `img.resize((W, H), Image.BILINEAR)` of the decoded source (what
    torchvision's Resize does on a PIL image); metadata `resize` lists the cases.
  * `norm.<name>` [1, 3, H, W] f32: torchvision's ToTensor then Normalize(ImageNet mean, std) in f32, written
    out as torchvision's code does it; `pyr.<name>.<s>`: F.interpolate(norm, size=(H // 2^s, W // 2^s)) (mode
    nearest, the default).
"""
import json
import os
import struct
import zlib

import numpy as np
import skimage
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "csflow", "tests", "fixtures", "images", "parity")
DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def photo(name, size, box):
    """A downsized crop of one of skimage's photos (LANCZOS, so the result looks like a real small photo)."""
    return Image.open(os.path.join(DATA, name + ".png")).resize(size, Image.LANCZOS, box=box)


def png_raw(path, arr, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB, RGBA or LA)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def to16(a8, seed):
    """8-bit photo -> 16-bit with a random low byte, so that 16-bit to 8-bit conversions are told apart."""
    rng = np.random.default_rng(seed)
    return a8.astype(np.uint16) * 256 + rng.integers(0, 256, a8.shape, dtype=np.uint16)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    p = lambda f: os.path.join(OUT, f)

    # Sources: real photos, small. Resize sources are lossless PNGs.
    chelsea = photo("chelsea", (96, 80), (60, 0, 420, 300))  # RGB 96x80
    coffee = photo("coffee", (101, 77), (50, 0, 575, 400))  # RGB 101x77, odd
    small = photo("chelsea", (32, 24), (150, 40, 350, 190))  # RGB 32x24, the cat's face, for upscaling
    gravel = photo("gravel", (128, 96), (0, 0, 512, 384))  # L 128x96, for large downscale factors
    chelsea.save(p("chelsea_rgb.png"))
    coffee.save(p("coffee_rgb.png"))
    small.save(p("chelsea_small.png"))
    gravel.save(p("gravel_gray.png"))

    # The format matrix: 64x48 (RGB, gray) and 61x45 (alpha, 16-bit) crops.
    rgb = photo("coffee", (64, 48), (100, 0, 600, 375))
    gray = photo("brick", (64, 48), (0, 0, 512, 384))
    a_np = np.array(photo("gravel", (64, 48), (0, 0, 512, 384)))
    a_np[:8, :8] = 0  # a fully transparent corner: alpha is dropped, not composited
    rgb_np, gray_np = np.array(rgb), np.array(gray)
    rgba = Image.fromarray(np.dstack([np.array(chelsea)[:48, 16:80], a_np]), "RGBA").crop((0, 0, 61, 45))
    la = Image.fromarray(np.dstack([gray_np, a_np]), "LA")
    gray16 = np.array(photo("grass", (61, 45), (0, 0, 512, 378)))
    rgb16_np, rgba16_np, la16_np = rgb_np[:24, :32], np.array(rgba)[:24, :32], np.array(la)[:24, :32]

    rgb.save(p("coffee_rgb_small.png"))
    rgba.save(p("chelsea_rgba.png"))
    chelsea.quantize(64).crop((0, 0, 61, 45)).save(p("chelsea_palette.png"), transparency=0)
    gray.save(p("brick_gray.png"))
    la.save(p("brick_la.png"))
    gray.convert("1").save(p("brick_1bit.png"))
    Image.fromarray(to16(gray16, 1)).save(p("grass_gray16.png"))  # mode I;16
    png_raw(p("coffee_rgb16.png"), to16(rgb16_np, 2), 2)
    png_raw(p("chelsea_rgba16.png"), to16(rgba16_np, 3), 6)
    png_raw(p("brick_la16.png"), to16(la16_np, 4), 4)

    rgb.save(p("coffee_q90.jpg"), quality=90)  # Pillow's default subsampling: 4:2:0
    rgb.save(p("coffee_444.jpg"), quality=95, subsampling=0)
    gray.save(p("brick_gray.jpg"), quality=90)
    chelsea.crop((0, 0, 64, 48)).save(p("chelsea_progressive.jpg"), quality=85, progressive=True)

    rgb.save(p("coffee.bmp"))
    gray.save(p("brick_gray.bmp"))
    rgba.save(p("chelsea_rgba.bmp"))

    rgb.save(p("coffee.tif"))
    gray.save(p("brick_lzw.tif"), compression="tiff_lzw")
    Image.fromarray(to16(gray16, 5)).save(p("grass_gray16.tif"))
    tifffile.imwrite(p("coffee_rgb16.tif"), to16(rgb16_np, 6), photometric="rgb")
    rgba.save(p("chelsea_rgba_deflate.tif"), compression="tiff_adobe_deflate")

    rgb.save(p("coffee_lossless.webp"), lossless=True)
    rgba.save(p("chelsea_rgba_lossless.webp"), lossless=True)  # libwebp may change RGB where alpha = 0
    rgb.save(p("coffee_q90.webp"), quality=90)

    inputs = sorted(f for f in os.listdir(OUT))

    # Broken and unsupported files.
    good = open(p("chelsea_small.png"), "rb").read()
    open(p("bad_truncated.png"), "wb").write(good[: len(good) * 2 // 5])
    open(p("bad_garbage.png"), "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    open(p("bad_text.jpg"), "wb").write(b"this is not a JPEG file\n")
    small.save(p("bad_unsupported.gif"))
    huge_png = bytearray(open(p("chelsea_small.png"), "rb").read())
    ihdr = struct.pack(">II", 60000, 60000) + bytes(huge_png[24:29])
    huge_png[16:29] = ihdr
    huge_png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    open(p("huge_dims.png"), "wb").write(huge_png)
    # BITMAPFILEHEADER + BITMAPINFOHEADER of a 24-bit 60000 x 60000 image, and no pixels.
    huge_bmp = b"BM" + struct.pack("<IHHI", 54 + 3 * 60000 * 60000 % 2**32, 0, 0, 54)
    huge_bmp += struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    open(p("huge_dims.bmp"), "wb").write(huge_bmp)
    huge_jpg = bytearray(open(p("coffee_q90.jpg"), "rb").read())
    sof = huge_jpg.find(b"\xff\xc0")
    huge_jpg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    open(p("huge_dims.jpg"), "wb").write(huge_jpg)
    huge_tif = bytearray(open(p("brick_lzw.tif"), "rb").read())
    assert huge_tif[:2] == b"II"
    ifd = struct.unpack_from("<I", huge_tif, 4)[0]
    for i in range(struct.unpack_from("<H", huge_tif, ifd)[0]):
        e = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", huge_tif, e)
        if tag in (256, 257, 278):  # ImageWidth, ImageLength, RowsPerStrip (one strip, as written)
            struct.pack_into("<HHII", huge_tif, e, tag, 4, 1, 60000)  # as LONG
    open(p("huge_dims.tif"), "wb").write(huge_tif)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL refuses them too: check the header only
    for f in ["huge_dims.png", "huge_dims.bmp", "huge_dims.jpg", "huge_dims.tif"]:
        assert Image.open(p(f)).size[0] >= 60000, f
    Image.MAX_IMAGE_PIXELS = limit

    # What PIL decodes.
    tensors, decode, seen = {}, {}, {}
    resize_sources = ["chelsea_rgb.png", "coffee_rgb.png", "chelsea_small.png", "gravel_gray.png"]
    for f in inputs:
        if f in resize_sources:  # PNG RGB and L are covered by the matrix; their resizes test them again
            continue
        a = np.array(Image.open(p(f)).convert("RGB"))
        if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
            a = a[..., :1]
        key = next((k for k, v in seen.items() if v.shape == a.shape and (v == a).all()), None)
        if key is None:
            key = "pil." + f
            seen[key] = a
            tensors[key] = np.ascontiguousarray(a)
        decode[f] = key
    for f in ["grass_gray16.png", "grass_gray16.tif"]:
        im = Image.open(p(f))
        assert im.mode == "I;16", im.mode
        tensors["want." + f] = np.ascontiguousarray((np.array(im) >> 8).astype(np.uint8)[..., None])

    # Resize: PIL's antialiased bilinear, downscale, upscale, one axis, mixed, large factors, identity.
    resize_cases = {
        "chelsea_rgb.png": [(64, 64), (37, 45), (20, 24), (5, 7), (1, 1), (40, 96), (80, 50), (100, 30), (80, 96)],
        "coffee_rgb.png": [(64, 64), (33, 50), (87, 109), (77, 101)],
        "chelsea_small.png": [(61, 77), (24, 100)],
        "gravel_gray.png": [(12, 16), (13, 17), (64, 80), (2, 3)],
    }
    resize = []
    for src, sizes in resize_cases.items():
        img = Image.open(p(src)).convert("RGB")
        for h, w in sizes:
            r = np.array(img.resize((w, h), Image.BILINEAR))
            if (w, h) == img.size:  # identity: PIL copies; the test checks that csflow does too
                assert (r == np.array(img)).all()
                resize.append([src, h, w, None])
                continue
            if (r[..., 0] == r[..., 1]).all() and (r[..., 0] == r[..., 2]).all():
                r = r[..., :1]
            key = f"resize.{src}.{h}x{w}"
            tensors[key] = np.ascontiguousarray(r)
            resize.append([src, h, w, key])

    # Normalisation and the nearest pyramid, as torchvision and the authors' model do it.
    mean = torch.as_tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(STD, dtype=torch.float32)[:, None, None]
    norm = []
    for name, src, h, w in [("chelsea_32x32", "chelsea_rgb.png", 32, 32), ("coffee_29x35", "coffee_rgb.png", 29, 35)]:
        img = Image.open(p(src)).convert("RGB").resize((w, h), Image.BILINEAR)
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        t = t.to(torch.float32).div(255)  # torchvision ToTensor
        t = t.sub(mean).div(std)[None]  # torchvision Normalize
        tensors[f"norm.{name}"] = t.numpy().copy()
        for s in range(1, 4):
            y = F.interpolate(t, size=(h // 2**s, w // 2**s))
            tensors[f"pyr.{name}.{s}"] = y.numpy().copy()
        norm.append([name, src, h, w])

    meta = {"decode": json.dumps(decode), "resize": json.dumps(resize), "norm": json.dumps(norm)}
    save_file(tensors, p("expected.safetensors"), metadata=meta)
    total = sum(os.path.getsize(p(f)) for f in os.listdir(OUT))
    print(f"{len(os.listdir(OUT))} files, {total / 1024:.0f} KiB in {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
