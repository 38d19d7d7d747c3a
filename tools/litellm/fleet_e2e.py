"""Helpers of scripts/fleet-e2e.sh: the LiteLLM config for loopback nodes, the failover probe and
the observed summary. Loopback only. Secrets come from the environment and are never printed.

  fleet_e2e.py config OUT --trace T --nodes URL,URL,URL [--failover-model M --failover-nodes URL,URL]
                      [--strategy modelpool|simple-shuffle] [--pool-for-drive URL]
  fleet_e2e.py failover --url PROXY --model M --requests 124 --out FILE
  fleet_e2e.py admin NODE PATH...   (POST {} with the admin key: preload, pin)
  fleet_e2e.py summary --records FILE --nodes URL,URL,URL --trace T --out FILE [--failover FILE]
                       [--routing-stats FILE] [--limit BYTES] [--strategy NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import urllib.request
from typing import Any


def trace_models(path: str) -> dict[str, int]:
    """Model id -> size in bytes (from its first line carrying one) for a CSV trace."""
    sizes: dict[str, int] = {}
    header: list[str] | None = None
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            cells = line.rstrip("\n").split(",")
            if header is None:
                header = cells
                continue
            row = dict(zip(header, cells))
            model, op = row.get("model", ""), row.get("op", "")
            if model and not op:
                size = row.get("size_bytes", "")
                if model not in sizes or (sizes[model] == 0 and size):
                    sizes[model] = int(size) if size else 0
    return sizes


def write_config(args: argparse.Namespace) -> None:
    nodes = args.nodes.split(",")
    groups: list[tuple[str, list[str]]] = [(m, nodes) for m in trace_models(args.trace)]
    if args.failover_model:
        groups.append((args.failover_model, args.failover_nodes.split(",")))
    out: list[str] = ["# written by tools/litellm/fleet_e2e.py (the shape of tools/litellm/config.example.yaml)",
                      "model_list:"]
    for model, urls in groups:
        for url in urls:
            out += [
                f"  - model_name: {model}",
                "    litellm_params:",
                f"      model: openai/{model}",
                f"      api_base: {url}/v1",
                "      api_key: os.environ/MODELPOOL_API_KEY",
            ]
    out += ["litellm_settings:"]
    if args.strategy == "modelpool":
        out += ['  callbacks: ["modelpool_routing.proxy_handler"]']
    out += [
        "  request_timeout: 120",
        "router_settings:",
        "  routing_strategy: simple-shuffle",
        "  num_retries: 2",
        "  allowed_fails: 3",
        f"  cooldown_time: {args.cooldown_time}",
        "  retry_after: 0",
        "general_settings:",
        "  master_key: os.environ/LITELLM_MASTER_KEY",
        "  background_health_checks: false",
    ]
    if args.pool_for_drive:
        # `modelpool-sim drive` reads /admin/pool and /admin/events of its --url before and after
        # the run; through a proxy there are none, so these forward to one node (the records are
        # what the run is judged by; the per-node counters are read from every node afterwards).
        out += ["  pass_through_endpoints:"]
        for path in ("/admin/pool", "/admin/events"):
            out += [
                f'    - path: "{path}"',
                f'      target: "{args.pool_for_drive}{path}"',
                "      headers:",
                '        Authorization: "Bearer os.environ/MODELPOOL_ADMIN_KEY"',
            ]
    out += ["environment_variables:", '  HF_HUB_OFFLINE: "1"']
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")


async def failover(args: argparse.Namespace) -> None:
    """`requests` chat completions through the proxy, `concurrency` at a time, each sent at least
    `interval` seconds after the previous one, with a client that does not retry: the statuses
    the proxy returns (after LiteLLM's own retries)."""
    import httpx

    key = os.environ["LITELLM_MASTER_KEY"]
    statuses: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> None:
            await asyncio.sleep(i * args.interval)
            async with sem:
                r = await client.post(
                    f"{args.url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": args.model, "messages": [{"role": "user", "content": f"hi {i}"}],
                          "max_tokens": 4},
                )
                statuses[str(r.status_code)] += 1
                nodes[r.headers.get("llm_provider-x-modelpool-node", r.headers.get("x-modelpool-node", "?"))] += 1

        await asyncio.gather(*(one(i) for i in range(args.requests)))
    with open(args.out, "w") as f:
        json.dump({"requests": args.requests, "statuses": dict(statuses), "served_by": dict(nodes)}, f)


def get_json(url: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    key = os.environ.get("MODELPOOL_ADMIN_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def summary(args: argparse.Namespace) -> int:
    records = [json.loads(line) for line in open(args.records) if line.strip()]
    if records and isinstance(records[0], list):
        records = records[0]
    statuses = collections.Counter(str(r.get("status")) for r in records if r.get("kind", "request") == "request")
    per_node: dict[str, Any] = {}
    total = collections.Counter()
    for url in args.nodes.split(","):
        pool = get_json(f"{url}/admin/pool")
        res = get_json(f"{url}/admin/residency")
        st = pool["stats"]
        rej = st.get("rejections_by_code", {})
        row = {
            "hits": st["hits"],
            "joins": st["joins"],
            "loads": st["loads"],
            "evictions": sum(st.get("evictions_by_reason", {}).values()),
            "rejections_503": sum(rej.values()),
            "rejections_by_code": {k: v for k, v in rej.items() if v},
            "queued": st.get("queued", 0),
            "resident": sorted(m["id"] for m in res["models"] if m.get("phase") == "resident"),
        }
        per_node[res["node"]] = row
        for k in ("hits", "joins", "loads", "evictions", "rejections_503", "queued"):
            total[k] += row[k]
    sizes = trace_models(args.trace)
    servable = {m for m, s in sizes.items() if s <= args.limit}
    bad = [r for r in records if r.get("status") == 503 and r.get("model") in servable]
    failures = [f"{len(bad)} client-visible 503s for models a node could serve"] if bad else []
    if statuses.get("200", 0) == 0:
        failures.append("no request succeeded")
    out: dict[str, Any] = {
        "strategy": args.strategy,
        "requests": sum(statuses.values()),
        "client_statuses": dict(statuses),
        "client_503_while_servable": len(bad),
        "nodes": per_node,
        "total": dict(total),
        "distinct_resident": len({m for row in per_node.values() for m in row["resident"]}),
        "duplicate_resident_bytes": sum(
            sizes.get(m, 0) * (n - 1)
            for m, n in collections.Counter(m for row in per_node.values() for m in row["resident"]).items()
            if n > 1
        ),
    }
    if args.strategy == "modelpool":
        if not (args.routing_stats and os.path.exists(args.routing_stats)):
            failures.append("the routing strategy wrote no counters (was it loaded?)")
        else:
            out["router"] = json.load(open(args.routing_stats))
            # Every request has ended: the strategy's in-flight counts must be back to zero.
            if any(out["router"]["in_flight"].values()):
                failures.append(f"the strategy's in-flight counts did not return to 0: {out['router']['in_flight']}")
    if args.failover:
        fo = json.load(open(args.failover))
        if args.failover_bad_node:
            rej = get_json(f"{args.failover_bad_node}/admin/pool")["stats"]["rejections_by_code"]
            fo["refused_by_bad_node"] = sum(rej.values())
        out["failover"] = fo
        if args.strategy == "modelpool" and fo.get("refused_by_bad_node", 0):
            failures.append(f"failover: node 5 (residency: reject) was sent {fo['refused_by_bad_node']} requests")
        if args.strategy == "modelpool" and fo["statuses"].get("503", 0):
            failures.append(f"failover: {fo['statuses']['503']} client-visible 503s with a healthy node")
    out["failures"] = failures
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("out")
    c.add_argument("--trace", required=True)
    c.add_argument("--nodes", required=True)
    c.add_argument("--failover-model")
    c.add_argument("--failover-nodes")
    c.add_argument("--strategy", choices=("modelpool", "simple-shuffle"), default="modelpool")
    c.add_argument("--pool-for-drive")
    c.add_argument("--cooldown-time", type=float, default=5)
    f = sub.add_parser("failover")
    f.add_argument("--url", required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--requests", type=int, default=124)
    f.add_argument("--concurrency", type=int, default=1)
    f.add_argument("--interval", type=float, default=0.25)
    f.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--records", required=True)
    s.add_argument("--nodes", required=True)
    s.add_argument("--trace", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, required=True)
    s.add_argument("--strategy", default="modelpool")
    s.add_argument("--failover")
    s.add_argument("--routing-stats")
    s.add_argument("--failover-bad-node")
    ad = sub.add_parser("admin", help="POST {} to each PATH of the node (admin key from the environment)")
    ad.add_argument("node")
    ad.add_argument("paths", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "admin":
        for path in a.paths:
            get_json(f"{a.node}{path}", body=b"{}")
        return 0
    if a.cmd == "config":
        write_config(a)
        return 0
    if a.cmd == "failover":
        asyncio.run(failover(a))
        return 0
    return summary(a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
