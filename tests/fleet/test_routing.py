"""Tests of tools/litellm/modelpool_routing.py: the rule against tests/fleet/choices.json, the
strategy's bookkeeping (optimistic updates, in-flight counts, retries), and the residency cache
against a loopback HTTP server. Run with the fleet venv's Python (scripts/setup-fleet.sh):

    target/fleet-venv/bin/python tests/fleet/test_routing.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tools" / "litellm"))

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-list download

import modelpool_routing as mr  # noqa: E402

FIXTURE = json.loads((HERE / "choices.json").read_text())
MODEL = "llama-3.2-3b-instruct-4bit"


def entry(decision: str, evict: int = 0, wait: float | None = 0.0, model: str = MODEL) -> dict[str, Any]:
    return {"id": model, "phase": "absent", "leases": 0, "waiting": 0, "decision": decision,
            "evict_bytes": evict, "expected_wait_secs": wait}


def view(node: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"node": node, "limit": 7000000000, "used": 0, "models": list(entries)}


def deployment(i: int, model: str = MODEL) -> dict[str, Any]:
    return {"model_name": model, "model_info": {"id": f"dep-{i}"},
            "litellm_params": {"model": f"openai/{model}", "api_base": f"http://node-{i}:8080/v1"}}


class Rule(unittest.TestCase):
    def test_fixture(self) -> None:
        for case in FIXTURE["cases"]:
            with self.subTest(case["name"]):
                got = mr.choose(case["views"], case["model"], case["in_flight"], case["home_rank"])
                self.assertEqual(got, case["expected"], case["name"])

    def test_fixture_covers_every_class(self) -> None:
        seen = {mr.classify(mr.entry_for(v, c["model"])) for c in FIXTURE["cases"] for v in c["views"]}
        self.assertEqual(seen, set(range(7)))
        chosen = {mr.classify(mr.entry_for(c["views"][c["expected"]], c["model"])) for c in FIXTURE["cases"]}
        self.assertEqual(chosen, set(range(7)), "every class is the winner of some case")

    def test_home_orders(self) -> None:
        # FNV-1a 64's published value for "a", then the fixture's orders (the simulator's too).
        self.assertEqual(mr.fnv1a("a"), 0xAF63DC4C8601EC8C)
        for case in FIXTURE["home_orders"]:
            with self.subTest(f"{case['model']!r} over {case['nodes']}"):
                self.assertEqual(mr.home_order(case["model"], case["nodes"]), case["order"])
                ranks = mr.home_ranks(case["model"], case["nodes"])
                self.assertEqual([ranks[p] for p in case["order"]], list(range(case["nodes"])))
        # Homes spread over the nodes (40 models over 3 nodes: each node is home to some).
        homes = {mr.home_order(f"model-{i}", 3)[0] for i in range(40)}
        self.assertEqual(homes, {0, 1, 2})

    def test_classes(self) -> None:
        self.assertEqual(mr.classify(entry("hit")), 0)
        self.assertEqual(mr.classify(entry("join")), 1)
        self.assertEqual(mr.classify(entry("load")), 2)
        self.assertEqual(mr.classify(entry("load", evict=1)), 3)
        self.assertEqual(mr.classify(entry("await_unload")), 3)
        self.assertEqual(mr.classify(entry("queue")), 4)
        self.assertEqual(mr.classify(entry("reject", wait=None)), 5)
        self.assertEqual(mr.classify(None), 6)
        self.assertEqual(mr.classify(entry("something-new")), 6)

    def test_bad_input(self) -> None:
        with self.assertRaises(ValueError):
            mr.choose([], MODEL, [])
        with self.assertRaises(ValueError):
            mr.choose([None], MODEL, [0, 1])

    def test_names(self) -> None:
        self.assertEqual(mr.node_base("http://h:1/v1"), "http://h:1")
        self.assertEqual(mr.node_base("http://h:1/v1/"), "http://h:1")
        self.assertEqual(mr.node_base("http://h:1"), "http://h:1")
        self.assertEqual(mr.deployment_model_id(deployment(0)), MODEL)
        d = deployment(0)
        d["model_info"]["modelpool_model"] = "other"
        self.assertEqual(mr.deployment_model_id(d), "other")


def strategy_with(views: list[dict[str, Any] | None]) -> mr.ModelpoolRouting:
    """A strategy whose cache holds these views as fresh (no fetch happens within the TTL)."""
    s = mr.ModelpoolRouting(ttl=3600, timeout=0.1)
    s.stats_file = None
    for i, v in enumerate(views):
        s.cache.put(f"http://node-{i}:8080", v)
    return s


class Strategy(unittest.TestCase):
    def test_optimistic_join_spreads_nothing_and_counts_in_flight(self) -> None:
        # The model's home among two positions is position 1 (tests/fleet/choices.json).
        self.assertEqual(mr.home_order(MODEL, 2), [1, 0])
        s = strategy_with([view("n0", entry("load", wait=0.2)), view("n1", entry("load", wait=0.3))])
        deps = [deployment(0), deployment(1)]
        first = asyncio.run(s.pick(deps, call_id="a"))
        self.assertEqual(first["model_info"]["id"], "dep-1", "a load goes to the model's home")
        self.assertEqual(mr.entry_for(s.cache.view("http://node-1:8080"), MODEL)["decision"], "join")
        # The next request joins the load on node 1 instead of loading a second copy on node 0.
        second = asyncio.run(s.pick(deps, call_id="b"))
        self.assertEqual(second["model_info"]["id"], "dep-1")
        self.assertEqual(s.in_flight, {"http://node-1:8080": 2})
        s.call_ended("a", "dep-1", failed=False)
        s.call_ended("b", "dep-1", failed=False)
        self.assertEqual(s.in_flight, {"http://node-1:8080": 0})
        # Home ranks come from the whole group: with node 1 cooling down (not a candidate), the
        # load goes to node 0 and node 0 is not mistaken for the home of a one-node group.
        s2 = strategy_with([view("n0", entry("load", wait=0.2)), view("n1", entry("load", wait=0.3))])
        self.assertEqual(asyncio.run(s2.pick([deps[0]], group=deps))["model_info"]["id"], "dep-0")
        self.assertEqual(s.choices_by_class[mr.LOAD_FREE], 1)
        self.assertEqual(s.choices_by_class[mr.JOIN], 1)

    def test_retry_goes_elsewhere_and_ends_the_failed_attempt(self) -> None:
        s = strategy_with([view("n0", entry("hit")), view("n1", entry("load", evict=10, wait=1.0))])
        deps = [deployment(0), deployment(1)]
        self.assertEqual(asyncio.run(s.pick(deps, call_id="r"))["model_info"]["id"], "dep-0")
        # LiteLLM retries the same request (same call id): node 0 refused it.
        again = asyncio.run(s.pick(deps, retry=True, call_id="r"))
        self.assertEqual(again["model_info"]["id"], "dep-1")
        self.assertEqual(mr.entry_for(s.cache.view("http://node-0:8080"), MODEL)["decision"], "reject")
        self.assertEqual(s.in_flight, {"http://node-0:8080": 0, "http://node-1:8080": 1})
        s.call_ended("r", "dep-1", failed=False)
        self.assertEqual(s.in_flight["http://node-1:8080"], 0)
        # An end event for a request that is not open changes nothing.
        s.call_ended("unknown", "dep-1", failed=True)
        self.assertEqual(s.in_flight["http://node-1:8080"], 0)
        self.assertEqual(s.open, [])

    def test_refusal_headers_set_the_learnt_entry(self) -> None:
        # Per-attempt failure events (the Python Router) carry the reply's headers.
        s = strategy_with([view("n0", entry("hit")), view("n1", entry("hit"))])
        deps = [deployment(0), deployment(1)]
        asyncio.run(s.pick(deps))
        s.call_ended("attempt-1", "dep-0", failed=True, retry_after=7.0, never=False)
        got = mr.entry_for(s.cache.view("http://node-0:8080"), MODEL)
        self.assertEqual((got["decision"], got["evict_bytes"], got["expected_wait_secs"]), ("reject", 0, 7.0))
        self.assertEqual(s.in_flight["http://node-0:8080"], 0)
        # A late event for an attempt a retry's pick already ended changes nothing.
        asyncio.run(s.pick(deps, call_id="c"))  # node 1 (node 0 now refuses)
        asyncio.run(s.pick(deps, retry=True, call_id="c"))  # node 1 refused too: back to node 0
        self.assertEqual(s.in_flight, {"http://node-0:8080": 1, "http://node-1:8080": 0})
        s.call_ended("c", "dep-1", failed=True)
        self.assertEqual(s.in_flight, {"http://node-0:8080": 1, "http://node-1:8080": 0})
        s.call_ended("c", "dep-0", failed=False)
        self.assertEqual(s.in_flight["http://node-0:8080"], 0)

    def test_refusal_from_headers(self) -> None:
        class Reply(Exception):
            litellm_response_headers = {"retry-after": "3", "x-should-retry": "false"}

        self.assertEqual(mr._refusal({"exception": Reply()}), (3.0, True))
        self.assertEqual(mr._refusal({"exception": ValueError()}), (None, False))

    def test_without_call_ids_calls_end_by_deployment(self) -> None:
        s = strategy_with([view("n0", entry("hit")), None])
        deps = [deployment(0), deployment(1)]
        asyncio.run(s.pick(deps))
        asyncio.run(s.pick(deps))
        self.assertEqual(s.in_flight["http://node-0:8080"], 2)
        s.call_ended(None, "dep-0", failed=True)
        self.assertEqual(s.in_flight["http://node-0:8080"], 1)
        self.assertEqual(mr.entry_for(s.cache.view("http://node-0:8080"), MODEL)["decision"], "reject")

    def test_never_succeeding_refusal_is_not_sent_again(self) -> None:
        import litellm

        s = strategy_with([view("n0", entry("reject", wait=None)), view("n1", entry("reject", wait=None))])
        deps = [deployment(0), deployment(1)]
        # The first attempt still goes to a node: its own error reaches the client.
        self.assertEqual(asyncio.run(s.pick(deps, call_id="t"))["model_info"]["id"], "dep-0")
        with self.assertRaises(litellm.ServiceUnavailableError) as raised:
            asyncio.run(s.pick(deps, retry=True, last_error="Model too large: ...", call_id="t"))
        self.assertIn("Model too large", str(raised.exception))
        self.assertEqual(s.refused_locally, 1)
        self.assertEqual(sum(s.in_flight.values()), 0)
        # A refusal with a retry hint is worth another node: no local refusal then.
        s2 = strategy_with([view("n0", entry("reject", wait=None)), view("n1", entry("reject", wait=2.0))])
        self.assertEqual(asyncio.run(s2.pick(deps, retry=True))["model_info"]["id"], "dep-1")
        # A node that refused a request it could admit later (no x-should-retry: false) is not a
        # reason to give up: the learnt entry has no hint but is not "never".
        s3 = strategy_with([view("n0", entry("hit")), view("n1", entry("reject", wait=None))])
        self.assertEqual(asyncio.run(s3.pick(deps, call_id="u"))["model_info"]["id"], "dep-0")
        # (both are now class 5 without a hint: the tie goes to node 0, as in the simulator)
        self.assertEqual(asyncio.run(s3.pick(deps, retry=True, call_id="u"))["model_info"]["id"], "dep-0")
        self.assertEqual(s3.refused_locally, 0)
        # With x-should-retry: false from the reply, it is.
        s4 = strategy_with([view("n0", entry("hit")), view("n1", entry("reject", wait=None))])
        asyncio.run(s4.pick(deps))
        s4.call_ended(None, "dep-0", failed=True, never=True)
        with self.assertRaises(litellm.ServiceUnavailableError):
            asyncio.run(s4.pick(deps, retry=True))


class Install(unittest.TestCase):
    def test_install_on_a_router(self) -> None:
        import litellm
        from litellm.router import CustomRoutingStrategyBase

        router = litellm.Router(model_list=[deployment(0), deployment(1)])
        handler = mr.install(router)
        try:
            self.assertIsInstance(handler.strategy, CustomRoutingStrategyBase)
            self.assertIs(router._modelpool_routing, handler.strategy)
            self.assertEqual(router.async_get_available_deployment, handler.strategy.async_get_available_deployment)
            handler.install(router)  # a second install changes nothing
            self.assertIs(router._modelpool_routing, handler.strategy)
        finally:
            litellm.callbacks.remove(handler)


class Handler(BaseHTTPRequestHandler):
    seen_auth: list[str | None] = []
    body = b"{}"

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen_auth.append(self.headers.get("Authorization"))
        if self.path != "/admin/residency":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(Handler.body)

    def log_message(self, *args: Any) -> None:
        pass


class Cache(unittest.TestCase):
    def setUp(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        Handler.seen_auth = []
        Handler.body = json.dumps(view("node-x", entry("hit"))).encode()

    def tearDown(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def test_fetch_cache_and_failure(self) -> None:
        dead = "http://127.0.0.1:9"  # discard port: nothing listens

        async def go() -> mr.ResidencyCache:
            c = mr.ResidencyCache(ttl=3600, timeout=0.5, admin_key="k-test")
            await c.refresh([self.base, self.base, dead])
            await c.refresh([self.base, dead])  # fresh: no second fetch
            return c

        c = asyncio.run(go())
        self.assertEqual(c.view(self.base)["node"], "node-x")
        self.assertIsNone(c.view(dead))
        self.assertEqual(Handler.seen_auth, ["Bearer k-test"])
        self.assertEqual((c.fetches, c.fetch_failures), (2, 1))

    def test_refetch_after_ttl(self) -> None:
        async def go() -> mr.ResidencyCache:
            c = mr.ResidencyCache(ttl=0.0, timeout=0.5)
            await c.refresh([self.base])
            await c.refresh([self.base])
            return c

        c = asyncio.run(go())
        self.assertEqual(c.fetches, 2)
        self.assertEqual(Handler.seen_auth, [None, None])


if __name__ == "__main__":
    os.environ.pop("MODELPOOL_ROUTING_STATS", None)
    result = unittest.main(exit=False, verbosity=1).result
    failed = len(result.failures) + len(result.errors)
    print(f"routing: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed or not result.wasSuccessful() else 0)
