#!/usr/bin/env python3
"""SmolLM2-135M decode/prefill with llama.cpp (llama-cpp-python) on the same GGUF file, its
native Q4_1 kernels, 2 threads, batch 1, greedy. Same prompt lengths and step count as the Rust
bench (benches/mlx_decode.rs) and scripts/bench-python-mlx.py; token ids are synthetic.

Setup (one-off, about 15 minutes of compiling on 2 cores; not part of CI). Build without AMX:
the native build (GGML_NATIVE) segfaulted in decode on this VM, whose CPU reports AMX:
    CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_HTTPLIB=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
      -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
      .venv/bin/pip install llama-cpp-python==0.3.36
Run:
    .venv/bin/python scripts/bench-llama-cpp.py models/smollm2-135m-instruct/*.gguf
"""

import sys
import time

import numpy as np
from llama_cpp import Llama


def main():
    path = sys.argv[1]
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=1024, n_batch=1024, n_threads=2, verbose=False)
    print(f"load: {time.perf_counter() - t0:.3f} s")
    print("| prompt tokens | prefill tok/s | decode tok/s |")
    print("|---:|---:|---:|")
    steps = 128
    for n_prompt in (126, 451):
        ids = [(i * 37) % 49000 + 100 for i in range(n_prompt)]
        for warm in (True, False):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            prefill = time.perf_counter() - t
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t = time.perf_counter()
            for _ in range(4 if warm else steps):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            decode = time.perf_counter() - t
        print(f"| {n_prompt} | {n_prompt / prefill:.1f} | {steps / decode:.1f} |")


if __name__ == "__main__":
    main()
