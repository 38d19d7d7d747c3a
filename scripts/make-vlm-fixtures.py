#!/usr/bin/env python3
"""Builds the vision-language test fixtures under tests/fixtures/vlm/ with mlx-vlm's own model
classes and processors: tiny random-weight Idefics3 (SmolVLM), Qwen2-VL and Qwen2.5-VL
checkpoints, synthetic PNG images, and per-stage reference tensors (pixel values, vision
embeddings, connector / merger output, merged input embeddings, Qwen's 3-axis M-RoPE position
ids, logits, greedy ids) that the Rust implementation is checked against. Flags `--idefics3`,
`--qwen2-vl`, `--qwen2-5-vl` build only those families (default: all).
Greedy ids: an argmax loop over `model.language_model` with mlx-vlm's KVCache (8 steps, past the
end-of-utterance token), asserted equal to mlx-vlm's `stream_generate` at temperature 0 up to
where that stops. cases.json also records, per case, the expanded prompt (the processor's input
ids decoded; re-encoding is checked to give the same ids) and every resize of every image.
See tests/fixtures/vlm/README.md.

Run through scripts/setup-vlm-fixtures.sh (pinned venv: mlx 0.32.4, mlx-cpu 0.32.4,
mlx-vlm 0.7.10, transformers 5.24.0). Offline (HF_HUB_OFFLINE=1). Deterministic: a rerun
rewrites the same bytes. The output is committed, so CI needs no Python stack.
"""
import json
import os
import pathlib
import shutil
import struct
import sys
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/vlm"

# SmolVLM-Instruct's chat template.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)

CORPUS = [
    "What is in the picture? A small red square on a blue field, next to a green line.",
    "User: describe the image. Assistant: The image shows a gradient from dark to light.",
    "The quick brown fox jumps over the lazy dog. Pictures, colours, shapes and lines.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } - + = / \\ \" '",
] * 20


def write_png(path: pathlib.Path, w: int, h: int) -> None:
    """A deterministic, asymmetric RGB image (smooth gradients plus a pattern)."""
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            r = (x * 255) // max(w - 1, 1)
            g = (y * 255) // max(h - 1, 1)
            b = ((x * 3 + y * 5) % 64) * 4 if (x // 7 + y // 5) % 2 == 0 else 255 - (x * y) % 200
            row += bytes([r, g, b])
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def make_tokenizer(d: pathlib.Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<end_of_utterance>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 2048,
                "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
            },
            indent=2,
        )
        + "\n"
    )
    (d / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<end_of_utterance>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
            },
            indent=2,
        )
        + "\n"
    )
    return tok.get_vocab_size()


def resize_log(ip, im) -> dict:
    """Every resize the image processor makes for one image, as [width, height] pairs:
    `longest_edge` (to size.longest_edge), `encoder` (up to a multiple of the tile), `global`
    (the whole image at one tile); `steps` lists them all in order."""
    steps = []
    orig = ip.resize

    def rec(image, size, *a, **k):
        out = orig(image, size, *a, **k)
        steps.append([[int(image.shape[-1]), int(image.shape[-2])], [int(out.shape[-1]), int(out.shape[-2])]])
        return out

    ip.resize = rec
    try:
        ip([[im]])
    finally:
        del ip.resize
    res = {"steps": steps}
    for key, step in zip(["longest_edge", "encoder", "global"], steps):
        res[key] = step[1]
    return res


def idefics3(d: pathlib.Path) -> None:
    from mlx_vlm.models import idefics3 as m

    if d.exists():
        shutil.rmtree(d)
    model_dir = d / "model"
    model_dir.mkdir(parents=True)
    vocab = make_tokenizer(model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<image>")
    eos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<end_of_utterance>")
    text = {
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "idefics3_vision",
        "hidden_size": 40,
        "intermediate_size": 56,
        "num_attention_heads": 5,
        "num_hidden_layers": 2,
        "patch_size": 8,
        "image_size": 32,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
    }
    config = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": image_id,
        "scale_factor": 2,
        "vocab_size": vocab,
        "eos_token_id": eos_id,
        "text_config": text,
        "vision_config": vision,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}, indent=2) + "\n")
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Idefics3ImageProcessor",
                "processor_class": "Idefics3Processor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"longest_edge": 96},
                "resample": 1,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_image_splitting": True,
                "max_image_size": {"longest_edge": 32},
                "do_pad": True,
            },
            indent=2,
        )
        + "\n"
    )
    (model_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": "Idefics3Processor", "image_seq_len": 4}, indent=2) + "\n"
    )
    (model_dir / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE)

    # Random weights through mlx-vlm's own classes, saved in its layout.
    mx.random.seed(19)
    cfg = m.ModelConfig.from_dict(config)
    cfg.text_config = m.TextConfig.from_dict(text)
    cfg.vision_config = m.VisionConfig.from_dict(vision)
    model = m.Model(cfg)
    params = dict(tree_flatten(model.parameters()))
    # Scale so activations stay in a useful range (not saturated, not vanishing).
    rng = np.random.default_rng(19)
    weights = {}
    for k in sorted(params):
        shape = params[k].shape
        if k.endswith("norm.weight") or k.endswith("layer_norm1.weight") or k.endswith("layer_norm2.weight") or k.endswith("post_layernorm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith(".bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if len(shape) == 2 else int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
            if "embed_tokens" in k or "position_embedding" in k:
                a = 0.5 * rng.standard_normal(shape)
        weights[k] = mx.array(a.astype(np.float32))
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})

    from mlx_vlm.utils import load

    model, processor = load(str(model_dir))
    model.eval()

    images_dir = OUT / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(50, 40), (1000, 30), (30, 1000), (333, 77), (64, 64), (17, 301), (160, 120)]
    for w, h in sizes:
        write_png(images_dir / f"{w}x{h}.png", w, h)

    question = "What is in the picture?"
    cases = [(f"{w}x{h}", [f"{w}x{h}.png"]) for w, h in sizes] + [("two_images", ["50x40.png", "333x77.png"]), ("text_only", [])]
    ref = d / "ref"
    ref.mkdir()
    listing = []
    for name, files in cases:
        content = [{"type": "image"} for _ in files] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        imgs = [Image.open(images_dir / f).convert("RGB") for f in files]
        inputs = processor(text=prompt, images=imgs if imgs else None, return_tensors="np")
        ids = mx.array(np.asarray(inputs["input_ids"]))
        tensors = {"input_ids": ids.astype(mx.int32)}
        pixel_values = None
        if imgs:
            pixel_values = mx.array(np.asarray(inputs["pixel_values"]))
            mask = mx.array(np.asarray(inputs["pixel_attention_mask"]))
            tensors["pixel_values"] = pixel_values.astype(mx.float32)
            tensors["pixel_attention_mask"] = mask.astype(mx.int32)
            b, n, c, hh, ww = pixel_values.shape
            pv = pixel_values.reshape(b * n, c, hh, ww)
            vis, *_ = model.vision_model(pv.transpose(0, 2, 3, 1), patch_attention_mask=None, output_hidden_states=True)
            tensors["vision_embeddings"] = vis
            tensors["connector_output"] = model.connector(vis).reshape(-1, text["hidden_size"])
            emb = model.get_input_embeddings(ids, pixel_values, pixel_attention_mask=mask).inputs_embeds
        else:
            emb = model.language_model.embed_tokens(ids)
        tensors["inputs_embeds"] = emb[0]
        # Prompt logits (all positions) and greedy decoding with mlx-vlm's KV cache.
        from mlx_vlm.models.cache import KVCache

        cache = [KVCache() for _ in model.language_model.layers]
        out = model.language_model(ids, inputs_embeds=emb, cache=cache).logits
        tensors["logits"] = out[0]
        greedy, margins = [], []
        last = out[0, -1]
        for _ in range(8):
            top = np.sort(np.asarray(last))[::-1]
            margins.append(float(top[0] - top[1]))
            nxt = int(mx.argmax(last).item())
            greedy.append(nxt)
            step = model.language_model(mx.array([[nxt]]), cache=cache).logits
            last = step[0, -1]
        # Cross-check: mlx-vlm's own stream_generate (temperature 0, from the image files) gives
        # the same ids, up to its stop at the end-of-utterance token.
        from mlx_vlm.generate import stream_generate

        gen = [int(r.token) for r in stream_generate(
            model, processor, prompt, image=[str(images_dir / f) for f in files] or None, max_tokens=8, temperature=0.0
        )][:8]
        stop = greedy.index(eos_id) + 1 if eos_id in greedy else 8
        assert gen[:stop] == greedy[:stop], (name, gen, greedy)
        tensors["greedy_ids"] = mx.array(greedy, dtype=mx.int32)
        tensors["top2_margin"] = mx.array(margins, dtype=mx.float32)
        mx.eval(tensors)
        mx.save_safetensors(str(ref / f"{name}.safetensors"), dict(sorted(tensors.items())))
        rows, cols = [], []
        if imgs:
            info = processor.image_processor([imgs], return_row_col_info=True)
            rows, cols = [int(r) for r in info["rows"][0]], [int(c) for c in info["cols"][0]]
        # The expanded prompt: what the processor tokenized (decoding round-trips, checked).
        expanded = processor.tokenizer.decode(np.asarray(ids)[0].tolist(), skip_special_tokens=False)
        assert processor.tokenizer(expanded, add_special_tokens=False)["input_ids"] == np.asarray(ids)[0].tolist()
        resized = [resize_log(processor.image_processor, im) for im in imgs]
        listing.append(
            {
                "name": name,
                "images": files,
                "messages": messages,
                "prompt": prompt,
                "n_image_tokens": int((np.asarray(ids) == image_id).sum()),
                "tiles": int(tensors["pixel_values"].shape[1]) if imgs else 0,
                "rows": rows,
                "cols": cols,
                "image_sizes": [list(im.size) for im in imgs],
                "resized": resized,
                "expanded_prompt": expanded,
                "greedy_ids": greedy,
                "ref": f"ref/{name}.safetensors",
            }
        )
    (d / "cases.json").write_text(json.dumps({"image_token_id": image_id, "cases": listing}, indent=1) + "\n")

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (images and text parts; videos left out).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Per family: text and vision configs, all dimensions different from each other and from the
# other families' (so a wrong transpose shows), patch 4 so the committed refs stay small.
QWEN_FAMILIES = {
    "qwen2_vl": {
        "architecture": "Qwen2VLForConditionalGeneration",
        "seed": 20,
        "text": {
            "hidden_size": 48,
            "intermediate_size": 88,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 2, 3]},
        },
        "vision": {
            "depth": 2,
            "embed_dim": 40,
            "hidden_size": 48,
            "num_heads": 5,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
    },
    "qwen2_5_vl": {
        "architecture": "Qwen2_5_VLForConditionalGeneration",
        "seed": 25,
        "text": {
            "hidden_size": 40,
            "intermediate_size": 72,
            "num_attention_heads": 5,
            "num_key_value_heads": 1,
            "num_hidden_layers": 2,
            "rope_theta": 50000.0,
            "tie_word_embeddings": False,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        },
        "vision": {
            "depth": 3,
            "hidden_size": 24,
            "intermediate_size": 56,
            "out_hidden_size": 40,
            "num_heads": 3,
            "patch_size": 4,
            "spatial_patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        },
    },
}


def qwen_vl(d: pathlib.Path, family: str) -> None:
    import importlib

    m = importlib.import_module(f"mlx_vlm.models.{family}")
    fam = QWEN_FAMILIES[family]

    if d.exists():
        shutil.rmtree(d)
    model_dir = d / "model"
    model_dir.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    sid = {t: tok.token_to_id(t) for t in QWEN_SPECIAL}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 2048}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    (model_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE}, indent=2) + "\n")
    text = {
        "model_type": family,
        **fam["text"],
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
    }
    vision = {"model_type": family, **fam["vision"]}
    config = {
        "architectures": [fam["architecture"]],
        "model_type": family,
        "image_token_id": sid["<|image_pad|>"],
        "video_token_id": sid["<|video_pad|>"],
        "vision_start_token_id": sid["<|vision_start|>"],
        "vision_end_token_id": sid["<|vision_end|>"],
        "eos_token_id": sid["<|im_end|>"],
        "text_config": text,
        "vision_config": vision,
    }
    config.update({k: v for k, v in text.items() if k != "model_type"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": sid["<|im_end|>"]}, indent=2) + "\n")
    patch = fam["vision"]["patch_size"]
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor",
                "do_resize": True,
                "min_pixels": (patch * 2) ** 2 * 4,
                "max_pixels": (patch * 2) ** 2 * 16,
                "patch_size": patch,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
                "resample": 3,
            },
            indent=2,
        )
        + "\n"
    )

    mx.random.seed(fam["seed"])
    cfg = m.ModelConfig.from_dict(dict(config))
    cfg.text_config = m.TextConfig.from_dict(text)
    cfg.vision_config = m.VisionConfig.from_dict(vision)
    params = dict(tree_flatten(m.Model(cfg).parameters()))
    rng = np.random.default_rng(fam["seed"])
    weights = {}
    for k in sorted(params):
        shape = params[k].shape
        if k.endswith(".weight") and ("norm" in k or "ln_q" in k):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith(".bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
            if "embed_tokens" in k:
                # Tied embeddings: smaller, or every token predicts itself and greedy repeats.
                a = (0.1 if fam["text"]["tie_word_embeddings"] else 0.5) * rng.standard_normal(shape)
        weights[k] = mx.array(a.astype(np.float32))
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})

    from mlx_vlm.generate import stream_generate
    from mlx_vlm.utils import load

    model, processor = load(str(model_dir))
    model.eval()
    vt = model.vision_tower
    width = fam["vision"].get("embed_dim", fam["vision"]["hidden_size"])
    images_dir = OUT / "images"
    question = "What is in the picture?"
    names = ["50x40", "1000x30", "30x1000", "333x77", "64x64", "17x301", "160x120"]
    cases = [(n, [f"{n}.png"]) for n in names] + [("two_images", ["50x40.png", "333x77.png"]), ("text_only", [])]
    ref = d / "ref"
    ref.mkdir()
    listing = []
    for name, files in cases:
        content = [{"type": "image"} for _ in files] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        imgs = [Image.open(images_dir / f).convert("RGB") for f in files]
        inputs = processor(text=prompt, images=imgs if imgs else None, return_tensors="np")
        ids = mx.array(np.asarray(inputs["input_ids"]))
        tensors = {"input_ids": ids.astype(mx.int32)}
        kw = {}

        def reset():
            # mlx-vlm's Qwen2-VL language model keeps the last image's M-RoPE positions between
            # calls (reset only when pixel values come in): clear them before every pass.
            model.language_model._rope_deltas = None
            model.language_model._position_ids = None

        reset()
        if imgs:
            pv = mx.array(np.asarray(inputs["pixel_values"])).astype(mx.float32)
            thw = mx.array(np.asarray(inputs["image_grid_thw"]))
            tensors["pixel_values"] = pv
            tensors["image_grid_thw"] = thw.astype(mx.int32)
            # The blocks' output before the merger, in patch order: the tower run with its merger
            # replaced by the merger's reshape alone (Qwen2.5-VL then undoes its window order).
            merger = vt.merger
            vt.merger = lambda x: x.reshape(-1, 4 * width)
            try:
                tensors["vision_embeddings"] = vt(pv, thw, output_hidden_states=False).reshape(-1, width)
            finally:
                vt.merger = merger
            tensors["merger_output"] = vt(pv, thw, output_hidden_states=False)
            kw = {"pixel_values": pv, "image_grid_thw": thw}
            feats = model.get_input_embeddings(ids, pv, image_grid_thw=thw)
        else:
            feats = model.get_input_embeddings(ids)
        tensors["inputs_embeds"] = feats.inputs_embeds[0]
        tensors["position_ids"] = feats.position_ids.astype(mx.int32)
        reset()
        # Last-position logits only (the stage test runs the whole prompt; all positions would
        # take the fixture past its size budget).
        tensors["logits"] = model(ids, **kw).logits[0, -1:]
        reset()
        # Greedy ids: mlx-vlm's own stream_generate at temperature 0. Margins (and a check of each
        # id) from full forward passes over prompt + the ids so far.
        gen = [int(r.token) for r in stream_generate(
            model, processor, prompt, image=[str(images_dir / f) for f in files] or None, max_tokens=8, temperature=0.0
        )][:8]
        margins = []
        seq = np.asarray(ids)[0].tolist()
        for t in gen:
            reset()
            last = np.asarray(model(mx.array([seq]), **kw).logits[0, -1])
            top = np.sort(last)[::-1]
            assert int(np.argmax(last)) == t, (name, gen)
            margins.append(float(top[0] - top[1]))
            seq.append(t)
        tensors["greedy_ids"] = mx.array(gen, dtype=mx.int32)
        tensors["top2_margin"] = mx.array(margins, dtype=mx.float32)
        mx.eval(tensors)
        mx.save_safetensors(str(ref / f"{name}.safetensors"), dict(sorted(tensors.items())))
        expanded = processor.tokenizer.decode(np.asarray(ids)[0].tolist(), skip_special_tokens=False)
        grids = np.asarray(inputs["image_grid_thw"]).tolist() if imgs else []
        listing.append(
            {
                "name": name,
                "images": files,
                "messages": messages,
                "prompt": prompt,
                "expanded_prompt": expanded,
                "n_image_tokens": int((np.asarray(ids) == sid["<|image_pad|>"]).sum()),
                "image_sizes": [list(im.size) for im in imgs],
                "grid_thw": grids,
                "resized": [[int(g[2]) * patch, int(g[1]) * patch] for g in grids],
                "greedy_ids": gen,
                "ref": f"ref/{name}.safetensors",
            }
        )
    (d / "cases.json").write_text(json.dumps({"image_token_id": sid["<|image_pad|>"], "cases": listing}, indent=1) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    only = [a[2:] for a in sys.argv[1:] if a.startswith("--")]
    for family in ["idefics3", *QWEN_FAMILIES]:
        if only and family.replace("_", "-") not in only:
            continue
        if family == "idefics3":
            idefics3(OUT / "idefics3")
        else:
            qwen_vl(OUT / family, family)
    print(f"make-vlm-fixtures: wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
