"""End-to-end: images in chat through the official `openai` Python client and the MLX backend.

Run by scripts/e2e-openai.sh, which serves the tiny Idefics3 and Qwen2-VL checkpoints of
tests/fixtures/vlm (random weights built with mlx-vlm's own classes) as `smolvlm-tiny` and
`qwen2-vl-tiny` with `--backend mlx` and passes the URL in MODELPOOL_URL. The expected
prompt-token counts are mlx-vlm's, from the fixtures' cases.json. Exits non-zero if any check
fails.
"""

import base64
import json
import os
import struct
import sys
import urllib.request
import zlib
from pathlib import Path

import openai
from runner import run
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "vlm"
URL = os.environ["MODELPOOL_URL"].rstrip("/")
client = OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=60)
MODEL = "smolvlm-tiny"
CASES = {c["name"]: c for c in json.loads((FIX / "idefics3" / "cases.json").read_text())["cases"]}
QWEN = "qwen2-vl-tiny"
QWEN_CASES = {c["name"]: c for c in json.loads((FIX / "qwen2_vl" / "cases.json").read_text())["cases"]}


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def huge_png(w, h):
    """A PNG whose header says `w` x `h` and whose data is one empty row: refused from the header."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * w + 1))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def image_message(url, text="What is in the picture?"):
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def text_only_prompt_tokens(model=MODEL):
    """Prompt tokens of the same chat without the image, as the server counts them."""
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is in the picture?"}],
        max_tokens=1,
        temperature=0,
    )
    return r.usage.prompt_tokens


def phases():
    with urllib.request.urlopen(URL + "/admin/pool", timeout=10) as r:
        return {m["id"]: m["phase"] for m in json.load(r)["models"]}


def test_bad_images_are_400s_that_load_nothing():
    assert phases()[MODEL] == "absent", phases()
    png = (FIX / "images" / "64x64.png").read_bytes()
    bad = {
        "truncated PNG": ("data:image/png;base64," + base64.b64encode(png[:60]).decode(), "truncated or corrupt"),
        "invalid base64": ("data:image/png;base64,@@not base64@@", "invalid base64"),
        "remote URL while disabled": ("https://example.com/cat.png", "--remote-images"),
        "file URL": ("file:///etc/passwd", "file: URLs are never accepted"),
        "100-megapixel image": (
            "data:image/png;base64," + base64.b64encode(huge_png(10_000, 10_000)).decode(),
            "more than --max-image-pixels 16777216",
        ),
        "unsupported format": ("data:image/gif;base64," + base64.b64encode(b"GIF89a" + bytes(20)).decode(), "accepted"),
    }
    for what, (url, needle) in bad.items():
        try:
            client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=4)
        except openai.BadRequestError as e:
            body = e.body or {}
            assert body.get("param") == "messages[0].content[0].image_url", (what, body)
            assert needle in body.get("message", ""), (what, body)
        else:
            raise AssertionError(f"{what}: accepted")
    nine = image_message(data_url(FIX / "images" / "64x64.png"))
    nine[0]["content"] = nine[0]["content"][:1] * 9
    try:
        client.chat.completions.create(model=MODEL, messages=nine, max_tokens=4)
    except openai.BadRequestError as e:
        assert "--max-images 8" in (e.body or {}).get("message", ""), e.body
    else:
        raise AssertionError("9 images accepted")
    assert phases()[MODEL] == "absent", ("a refused image loaded the model", phases())


def test_image_chat_plain_and_streaming():
    case = CASES["1000x30"]
    msgs = image_message(data_url(FIX / "images" / "1000x30.png"), case["messages"][0]["content"][1]["text"])
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == len(case["greedy_ids"]) == 8, r.usage
    # The image became mlx-vlm's number of image tokens (plus the tile and image markers
    # the processor adds around them) on top of the text-only prompt.
    assert r.usage.prompt_tokens > text_only_prompt_tokens() + case["n_image_tokens"], r.usage
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, (streamed, text)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == r.usage.prompt_tokens, usage
    assert phases()[MODEL] == "resident", phases()


def test_qwen2_vl_image_chat_plain_and_streaming():
    """Qwen2-VL: the image becomes exactly mlx-vlm's <|image_pad|> count between
    <|vision_start|> and <|vision_end|>; plain and streaming agree; an image the processor
    refuses (aspect ratio over 200) is a 400."""
    for name in ["1000x30", "17x301"]:
        case = QWEN_CASES[name]
        msgs = image_message(data_url(FIX / "images" / f"{name}.png"), case["messages"][0]["content"][1]["text"])
        r = client.chat.completions.create(model=QWEN, messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason == "length", r
        assert r.usage.completion_tokens == 8, r.usage
        want = text_only_prompt_tokens(QWEN) + case["n_image_tokens"] + 2
        assert r.usage.prompt_tokens == want, (name, r.usage, want)
        chunks = list(
            client.chat.completions.create(
                model=QWEN, messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == r.choices[0].message.content, (streamed, r.choices[0].message.content)
        assert chunks[-1].usage.prompt_tokens == want, chunks[-1].usage
    try:
        client.chat.completions.create(
            model=QWEN, messages=image_message("data:image/png;base64," + base64.b64encode(thin_png(1, 300)).decode()), max_tokens=4
        )
    except openai.BadRequestError as e:
        assert "aspect ratio is over 200" in (e.body or {}).get("message", ""), e.body
    else:
        raise AssertionError("an image of aspect ratio 300 was accepted")


def thin_png(w, h):
    """A real `w` x `h` grey PNG."""

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\x80" * (3 * w) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


if __name__ == "__main__":
    sys.exit(run(globals()))
