#!/usr/bin/env python3
"""mlx-lm's own generation speed on an MLX model directory, for benches/mlx_decode.rs (section
"MLX-native directory", issue 17), which runs it in the mlx-lm venv (scripts/setup-mlx-models.sh)
on the same directory and prompt in the same run.

    bench-mlx-lm.py DIR PROMPT_FILE MAX_TOKENS [--upcast]   # prints one JSON line

Greedy (`make_sampler(0.0)`), raw prompt (no chat template), one short warm-up generation
first; the numbers are mlx-lm's own `stream_generate` figures (prompt_tps, generation_tps).
The model as mlx-lm loads it (quantized weights kept packed, bf16 scales), or with --upcast its
float parameters (scales, biases, norms) cast to float32 first, as modelpool holds them.
"""

import json
import sys

from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler


def main() -> None:
    path, prompt_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, tok = load(path)
    if "--upcast" in sys.argv[4:]:
        import mlx.core as mx
        from mlx.utils import tree_map

        up = lambda p: p.astype(mx.float32) if p.dtype in (mx.bfloat16, mx.float16) else p  # noqa: E731
        model.update(tree_map(up, model.parameters()))
    ids = tok.encode(open(prompt_file, encoding="utf-8").read())
    greedy = make_sampler(0.0)
    for _ in stream_generate(model, tok, ids[:4], max_tokens=2, sampler=greedy):
        pass
    last = None
    for last in stream_generate(model, tok, ids, max_tokens=max_tokens, sampler=greedy):
        pass
    print(
        json.dumps(
            {
                "prompt_tokens": last.prompt_tokens,
                "prompt_tps": last.prompt_tps,
                "generation_tokens": last.generation_tokens,
                "generation_tps": last.generation_tps,
            }
        )
    )


if __name__ == "__main__":
    main()
