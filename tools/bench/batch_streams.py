"""Concurrent streaming chat completions against a running modelpool server, with the official
`openai` client (AsyncOpenAI), for the continuous-batching table in docs/mlx.md (issue 9).

For each N in --streams, N streams of --tokens tokens (greedy, no stop) start together; per N it
prints one markdown row: total completion tokens (from the streams' usage), wall seconds,
aggregate tokens/s, its ratio to the N=1 row of the same run (the anchor), and the inter-token
gaps of each stream (time between consecutive content chunks) at p50 and p99 over all streams.
Usage: python batch_streams.py --base-url http://127.0.0.1:PORT/v1 --model ID [--streams 1,2,4]
"""

import argparse
import asyncio
import math
import time

from openai import AsyncOpenAI


async def one_stream(client, model, i, tokens):
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me a long story about the number {i}."}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    gaps, last, first, used = [], None, None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            else:
                first = now - start
            last = now
    return used, gaps, first


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[max(1, math.ceil(q * len(xs))) - 1]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    client = AsyncOpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=600)
    await one_stream(client, args.model, 0, 8)  # warm-up
    print("| streams | tokens | seconds | aggregate tok/s | ratio to 1 stream | gap p50 ms | gap p99 ms | first token p50 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    anchor = None
    for n in [int(x) for x in args.streams.split(",")]:
        t = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, args.model, i, args.tokens) for i in range(n)))
        secs = time.perf_counter() - t
        total = sum(r[0] for r in results)
        gaps = [g for r in results for g in r[1]]
        firsts = [r[2] for r in results if r[2] is not None]
        tps = total / secs
        anchor = anchor or tps
        print(
            f"| {n} | {total} | {secs:.2f} | {tps:.1f} | {tps / anchor:.2f}x | "
            f"{quantile(gaps, 0.5) * 1e3:.1f} | {quantile(gaps, 0.99) * 1e3:.1f} | {quantile(firsts, 0.5) * 1e3:.0f} |",
            flush=True,
        )


asyncio.run(main())
