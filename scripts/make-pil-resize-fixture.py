#!/usr/bin/env python3
"""Writes tests/fixtures/vlm/pil_resize.json: what Pillow's Image.resize gives for a synthetic
RGB image at several sizes and filters, so src/backend/mlx/resample.rs is checked byte for byte
against Pillow without a Python stack in CI. Deterministic: rerunning gives the same file.

    python3 -m venv /tmp/pilvenv && /tmp/pilvenv/bin/pip install pillow==13.0.0
    /tmp/pilvenv/bin/python scripts/make-pil-resize-fixture.py
"""
import base64
import json
import pathlib

from PIL import Image

W, H = 37, 23


def source() -> Image.Image:
    # The same formula as the Rust test's `pil_source()`.
    px = bytearray()
    for y in range(H):
        for x in range(W):
            px += bytes([(x * 7 + y * 3) % 256, (x * x + 5 * y) % 256, (255 - x * 4 + y * y) % 256])
    return Image.frombytes("RGB", (W, H), bytes(px))


def main() -> None:
    img = source()
    cases = []
    for name, f in [("lanczos", Image.LANCZOS), ("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)]:
        for w, h in [(11, 7), (64, 40), (5, 90), (37, 50), (80, 23), (1, 1), (300, 2), (30, 3), (37, 4)]:
            out = img.resize((w, h), resample=f)
            cases.append({"filter": name, "width": w, "height": h, "rgb": base64.b64encode(out.tobytes()).decode()})
    import PIL

    doc = {"pillow": PIL.__version__, "source": [W, H], "cases": cases}
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/vlm/pil_resize.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
