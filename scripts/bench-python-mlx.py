#!/usr/bin/env python3
"""SmolLM2-135M decode/prefill with Python MLX on the same GGUF and the same graph as the Rust
backend (src/backend/mlx/llama.rs): weights dequantized to f32 at load (scales/biases cast to
f32), fused qkv and gate/up matmuls, fast.rms_norm, interleaved fast.rope, fast SDPA, a KV cache
preallocated in 256-position steps, logits copied to the host and argmax there.

Setup (one-off, not part of CI):
    python3 -m venv .venv && .venv/bin/pip install mlx==0.32.2 mlx-cpu==0.32.2 numpy
Run (the wheel's libmlx uses its bundled reference BLAS unless OpenBLAS is preloaded):
    .venv/bin/python scripts/bench-python-mlx.py models/smollm2-135m-instruct/*.gguf
    LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/bench-python-mlx.py ...
Prints one markdown row per prompt length: prefill tok/s and decode tok/s (batch 1, greedy).
Token ids are synthetic (speed does not depend on them); prompt lengths match the Rust bench.
"""

import sys
import time

import mlx.core as mx
import numpy as np

GROUP = 32


def meta_num(meta, key, default=None):
    v = meta.get(key)
    if v is None:
        return default
    return v.item() if hasattr(v, "item") else v


def linear_weight(arrays, base):
    w = arrays[f"{base}.weight"]
    if f"{base}.scales" in arrays:
        s = arrays[f"{base}.scales"].astype(mx.float32)
        b = arrays[f"{base}.biases"].astype(mx.float32)
        bits = w.shape[1] // s.shape[1]
        return mx.dequantize(w, s, b, group_size=GROUP, bits=bits)
    return w.astype(mx.float32)


class Llama:
    def __init__(self, path):
        arrays, meta = mx.load(path, return_metadata=True)
        self.n_layers = int(meta_num(meta, "llama.block_count"))
        self.hidden = int(meta_num(meta, "llama.embedding_length"))
        self.n_heads = int(meta_num(meta, "llama.attention.head_count"))
        self.n_kv = int(meta_num(meta, "llama.attention.head_count_kv", self.n_heads))
        self.hd = self.hidden // self.n_heads
        self.base = float(meta_num(meta, "llama.rope.freq_base", 10000.0))
        self.eps = float(meta_num(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.embed = linear_weight(arrays, "token_embd")
        self.norm = arrays["output_norm.weight"].astype(mx.float32)
        mx.eval(self.embed, self.norm)
        self.layers = []
        for i in range(self.n_layers):
            p = f"blk.{i}"
            q, k, v = (linear_weight(arrays, f"{p}.attn_{n}") for n in ("q", "k", "v"))
            g, u = linear_weight(arrays, f"{p}.ffn_gate"), linear_weight(arrays, f"{p}.ffn_up")
            layer = dict(
                attn_norm=arrays[f"{p}.attn_norm.weight"].astype(mx.float32),
                qkv=mx.concatenate([q, k, v], axis=0),
                o=linear_weight(arrays, f"{p}.attn_output"),
                ffn_norm=arrays[f"{p}.ffn_norm.weight"].astype(mx.float32),
                gate_up=mx.concatenate([g, u], axis=0),
                down=linear_weight(arrays, f"{p}.ffn_down"),
                ffn=g.shape[0],
            )
            mx.eval(*[x for x in layer.values() if isinstance(x, mx.array)])
            self.layers.append(layer)
        del arrays

    def new_cache(self):
        return {"k": [None] * self.n_layers, "v": [None] * self.n_layers, "cap": 0, "len": 0}

    def reserve(self, cache, needed):
        if needed <= cache["cap"]:
            return
        new_cap = (needed + 255) // 256 * 256
        for key in ("k", "v"):
            for i in range(self.n_layers):
                z = mx.zeros((1, self.n_kv, new_cap, self.hd), dtype=mx.float32)
                old = cache[key][i]
                if old is not None:
                    z[:, :, : cache["len"], :] = old[:, :, : cache["len"], :]
                cache[key][i] = z
        cache["cap"] = new_cap

    def forward(self, ids, cache):
        t = len(ids)
        off = cache["len"]
        nh, nkv, hd = self.n_heads, self.n_kv, self.hd
        x = self.embed[mx.array(ids)].reshape(1, t, self.hidden)
        self.reserve(cache, off + t)
        for li, l in enumerate(self.layers):
            h = mx.fast.rms_norm(x, l["attn_norm"], self.eps)
            qkv = h @ l["qkv"].T
            q = qkv[..., : nh * hd].reshape(1, t, nh, hd).transpose(0, 2, 1, 3)
            k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(1, t, nkv, hd).transpose(0, 2, 1, 3)
            v = qkv[..., (nh + nkv) * hd :].reshape(1, t, nkv, hd).transpose(0, 2, 1, 3)
            q = mx.fast.rope(q, hd, traditional=True, base=self.base, scale=1.0, offset=off)
            k = mx.fast.rope(k, hd, traditional=True, base=self.base, scale=1.0, offset=off)
            cache["k"][li][:, :, off : off + t, :] = k
            cache["v"][li][:, :, off : off + t, :] = v
            keys = cache["k"][li][:, :, : off + t, :]
            values = cache["v"][li][:, :, : off + t, :]
            mask = "causal" if t > 1 else None
            a = mx.fast.scaled_dot_product_attention(q, keys, values, scale=hd**-0.5, mask=mask)
            a = a.transpose(0, 2, 1, 3).reshape(1, t, nh * hd)
            x = x + a @ l["o"].T
            h = mx.fast.rms_norm(x, l["ffn_norm"], self.eps)
            gu = h @ l["gate_up"].T
            g, u = gu[..., : l["ffn"]], gu[..., l["ffn"] :]
            x = x + (g * mx.sigmoid(g) * u) @ l["down"].T
        cache["len"] += t
        last = mx.fast.rms_norm(x[:, -1, :], self.norm, self.eps)
        return (last @ self.embed.T).reshape(-1)


def main():
    path = sys.argv[1]
    t0 = time.perf_counter()
    model = Llama(path)
    print(f"load (dequantized to f32): {time.perf_counter() - t0:.3f} s")
    print("| prompt tokens | prefill tok/s | decode tok/s |")
    print("|---:|---:|---:|")
    steps = 128
    for n_prompt in (126, 451):
        ids = [(i * 37) % 49000 + 100 for i in range(n_prompt)]
        for warm in (True, False):
            cache = model.new_cache()
            t = time.perf_counter()
            logits = np.array(model.forward(ids, cache))
            prefill = time.perf_counter() - t
            tok = int(np.argmax(logits))
            t = time.perf_counter()
            for _ in range(4 if warm else steps):
                logits = np.array(model.forward([tok], cache))
                tok = int(np.argmax(logits))
            decode = time.perf_counter() - t
        print(f"| {n_prompt} | {n_prompt / prefill:.1f} | {steps / decode:.1f} |")


if __name__ == "__main__":
    main()
