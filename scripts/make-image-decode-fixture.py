#!/usr/bin/env python3
"""Reference RGB pixels for image files as mlx-vlm reads them, for src/http/images.rs.

mlx-vlm 0.7.10's `load_image` (mlx_vlm/utils.py) opens a chat request's image with Pillow, applies
its EXIF orientation (`ImageOps.exif_transpose`) and converts it with `image.convert("RGB")`:
alpha is dropped (not composited), grayscale replicated, palettes looked up, 16-bit RGB(A)
reduced to its high byte and 16-bit grayscale clamped to 255. This script writes small image
files covering those paths (PNG of every colour type and depth, JPEG with and without EXIF
orientation, lossless and lossy WebP) and, for each, the RGB bytes Pillow gives after that
conversion. The Rust test `http::images::decoding_matches_mlx_vlms_load_image` decodes the same
files and compares.

Run with the pinned Pillow of scripts/setup-vlm-fixtures.sh:
    target/vlm-venv/bin/python scripts/make-image-decode-fixture.py
Writes tests/fixtures/images/ (files plus reference.json); a rerun writes the same bytes.
"""

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images"
W, H = 13, 7


def pattern(channels, maxval=255, seed=1):
    """Deterministic pixels: gradients plus a xorshift pattern, values in 0..=maxval."""
    x = 0x9E3779B97F4A7C15 ^ seed
    out = np.zeros((H, W, channels), dtype=np.int64)
    for r in range(H):
        for c in range(W):
            for k in range(channels):
                x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
                x ^= x >> 7
                x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
                grad = (r * W + c) * (maxval // (W * H)) if k % 2 == 0 else (c * maxval) // (W - 1)
                out[r, c, k] = (grad + (x % (maxval // 8 + 1))) % (maxval + 1)
    return out


def png(w, h, color_type, depth, rows, palette=None, trns=None):
    """A PNG written by hand, so every colour type and depth is covered exactly."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette)
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def rows_of(a, depth):
    fmt = ">H" if depth == 16 else "B"
    return [b"".join(struct.pack(fmt, int(v)) for v in a[r].reshape(-1)) for r in range(a.shape[0])]


def packed_rows(a, bits):
    """Rows of 1-, 2- or 4-bit samples, packed most significant first."""
    rows = []
    for r in range(a.shape[0]):
        vals, acc, n, row = a[r].reshape(-1), 0, 0, bytearray()
        for v in vals:
            acc = (acc << bits) | int(v)
            n += bits
            if n == 8:
                row.append(acc)
                acc, n = 0, 0
        if n:
            row.append(acc << (8 - n))
        rows.append(bytes(row))
    return rows


def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def files():
    rgb = pattern(3).astype(np.uint8)
    rgb_img = Image.fromarray(rgb, "RGB")
    yield "rgb8.png", png(W, H, 2, 8, rows_of(pattern(3), 8))
    yield "rgba8.png", png(W, H, 6, 8, rows_of(pattern(4, seed=2), 8))
    yield "gray8.png", png(W, H, 0, 8, rows_of(pattern(1, seed=3), 8))
    yield "gray-alpha8.png", png(W, H, 4, 8, rows_of(pattern(2, seed=4), 8))
    yield "gray1.png", png(W, H, 0, 1, packed_rows(pattern(1, 1, seed=5), 1))
    yield "gray4.png", png(W, H, 0, 4, packed_rows(pattern(1, 15, seed=6), 4))
    yield "rgb16.png", png(W, H, 2, 16, rows_of(pattern(3, 65535, seed=7), 16))
    yield "rgba16.png", png(W, H, 6, 16, rows_of(pattern(4, 65535, seed=8), 16))
    yield "gray16.png", png(W, H, 0, 16, rows_of(pattern(1, 600, seed=9), 16))
    pal = bytes(int(v) for v in pattern(3, seed=10).reshape(-1)[: 16 * 3])
    yield "palette4-trns.png", png(W, H, 3, 4, packed_rows(pattern(1, 15, seed=11), 4), pal, bytes(range(0, 256, 32)))
    buf = io.BytesIO()
    rgb_img.save(buf, "PNG", exif=exif(6))
    yield "rgb8-exif6.png", buf.getvalue()
    for name, kw in [
        ("rgb-q90.jpg", dict(quality=90)),
        ("rgb-q75-444.jpg", dict(quality=75, subsampling=0)),
        ("rgb-progressive.jpg", dict(quality=85, progressive=True)),
        ("rgb-exif3.jpg", dict(quality=90, exif=exif(3))),
        ("rgb-exif6.jpg", dict(quality=90, exif=exif(6))),
        ("rgb-exif8.jpg", dict(quality=90, exif=exif(8))),
    ]:
        buf = io.BytesIO()
        rgb_img.save(buf, "JPEG", **kw)
        yield name, buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(pattern(1, seed=12).astype(np.uint8)[:, :, 0], "L").save(buf, "JPEG", quality=90)
    yield "gray.jpg", buf.getvalue()
    rgba_img = Image.fromarray(pattern(4, seed=13).astype(np.uint8), "RGBA")
    buf = io.BytesIO()
    rgba_img.save(buf, "WEBP", lossless=True)
    yield "rgba-lossless.webp", buf.getvalue()
    buf = io.BytesIO()
    rgb_img.save(buf, "WEBP", quality=80)
    yield "rgb-lossy.webp", buf.getvalue()


def mlx_vlm_load_image(data):
    """mlx_vlm.utils.load_image on an already-decoded data URL."""
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ref = {"pillow": PIL.__version__, "cases": []}
    for name, data in files():
        (OUT / name).write_bytes(data)
        img = mlx_vlm_load_image(data)
        px = np.asarray(img, dtype=np.uint8)
        ref["cases"].append(
            {
                "file": name,
                "mode": Image.open(io.BytesIO(data)).mode,
                "width": img.width,
                "height": img.height,
                "rgb": px.reshape(-1).tolist(),
                "md5": hashlib.md5(data).hexdigest(),
            }
        )
    (OUT / "reference.json").write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"{len(ref['cases'])} cases in {OUT}")


if __name__ == "__main__":
    main()
