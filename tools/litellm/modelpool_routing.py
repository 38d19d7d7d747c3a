"""Residency-aware routing for LiteLLM in front of modelpool nodes (issue 18).

LiteLLM knows nothing about what a node has loaded. This strategy asks each node
(`GET /admin/residency`, cached for a short TTL) what a request for the model would meet there
and sends it to the node where admission is cheapest.

The rule (the fleet simulator's `residency` router implements the same; `tests/fleet/choices.json`
is the shared fixture):

- Candidates: the deployments of the requested model group that LiteLLM offers (its cooldown
  and other filters already applied), in model_list order. A candidate's node is its `api_base`
  minus a trailing `/v1`; the model's id on the node is `model_info.modelpool_model` if set, else
  `litellm_params.model` without its provider prefix (`openai/`).
- Class, from that node's view entry for the model id: `hit` = 0, `join` = 1, `load` with
  `evict_bytes == 0` = 2, `load` with eviction or `await_unload` = 3, `queue` = 4, `reject` = 5;
  node unreachable, no view, or the model absent from the view = 6.
- Choose the candidate with the smallest tuple
  (class, evict_bytes, expected_wait_secs (null = +inf), router_in_flight[node], index).
  For class 6 evict_bytes and expected_wait_secs count as 0 and +inf.
- Right after choosing: if the class was 2, 3 or 4, that node's cached entry for the model
  becomes `join` (evict_bytes 0, expected_wait_secs kept); the router's in-flight count for the
  node goes up by one. It goes down when the call ends (success or failure). A call that fails
  turns that node's cached entry for the model into `reject` (expected_wait_secs kept) until the
  next refresh, so a retry does not go back to the node that just refused (unless every other
  candidate is worse still).
- Views older than the TTL (default 1 s) are fetched again when a request needs them,
  concurrently across nodes, with a short timeout (default 0.5 s); a failed fetch leaves no view
  (class 6) until the next refresh.

Beyond the rule, one guard: on a retry (LiteLLM's `attempted_retries` > 0), when every candidate
is class 5 with `expected_wait_secs` null (a refusal waiting cannot cure, e.g. `model_too_large`
on every node), the strategy raises a 503 itself instead of sending the request again: LiteLLM
retries every 5xx and ignores `x-should-retry: false`, so without this a never-succeeding refusal
costs the nodes `num_retries + 1` requests; with it, one.

Use with the proxy (see `tools/litellm/config.example.yaml`):

    litellm_settings:
      callbacks: ["modelpool_routing.proxy_handler"]

with this directory on PYTHONPATH (or the module next to the config file). The handler installs
the strategy on the proxy's router on the first request and tracks in-flight counts. With the
Python `Router`: `install(router)`.

Each proxy worker process (`--num_workers`) keeps its own views and in-flight counts.

Settings (environment): MODELPOOL_ADMIN_KEY (sent as `Authorization: Bearer`),
MODELPOOL_ROUTING_TTL (seconds, default 1), MODELPOOL_ROUTING_TIMEOUT (seconds, default 0.5),
MODELPOOL_ROUTING_STATS (a file where the strategy keeps its counters as JSON, for tests).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

View = Mapping[str, Any]

HIT, JOIN, LOAD_FREE, LOAD_EVICT, QUEUE, REJECT, UNKNOWN = range(7)


def entry_for(view: View | None, model_id: str) -> Mapping[str, Any] | None:
    """The view's entry for `model_id`, or None (no view, or the node does not know the model)."""
    if view is None:
        return None
    for entry in view.get("models") or ():
        if entry.get("id") == model_id:
            return entry
    return None


def classify(entry: Mapping[str, Any] | None) -> int:
    """The class (0 best .. 6 worst) of one node's view entry for the model."""
    if entry is None:
        return UNKNOWN
    decision = entry.get("decision")
    if decision == "hit":
        return HIT
    if decision == "join":
        return JOIN
    if decision == "load":
        return LOAD_FREE if (entry.get("evict_bytes") or 0) == 0 else LOAD_EVICT
    if decision == "await_unload":
        return LOAD_EVICT
    if decision == "queue":
        return QUEUE
    if decision == "reject":
        return REJECT
    return UNKNOWN


def sort_key(view: View | None, model_id: str, in_flight: int, index: int) -> tuple[int, int, float, int, int]:
    """The tuple the rule minimises for one candidate."""
    entry = entry_for(view, model_id)
    cls = classify(entry)
    if entry is None or cls == UNKNOWN:
        return (cls, 0, math.inf, in_flight, index)
    wait = entry.get("expected_wait_secs")
    return (cls, int(entry.get("evict_bytes") or 0), math.inf if wait is None else float(wait), in_flight, index)


def choose(views: Sequence[View | None], model_id: str, in_flight: Sequence[int]) -> int:
    """Index of the candidate to send a request for `model_id` to (the rule in the module doc).

    `views[i]` is candidate i's residency view (`GET /admin/residency` JSON) or None;
    `in_flight[i]` the router's open calls to that node.
    """
    if not views:
        raise ValueError("choose: no candidates")
    if len(views) != len(in_flight):
        raise ValueError("choose: views and in_flight differ in length")
    return min(range(len(views)), key=lambda i: sort_key(views[i], model_id, in_flight[i], i))


def node_base(api_base: str) -> str:
    """A deployment's node URL: its api_base without a trailing `/v1`."""
    base = api_base.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def deployment_model_id(deployment: Mapping[str, Any]) -> str:
    """The model's id on the node for a LiteLLM deployment."""
    info = deployment.get("model_info") or {}
    if info.get("modelpool_model"):
        return str(info["modelpool_model"])
    model = str((deployment.get("litellm_params") or {}).get("model", ""))
    return model.split("/", 1)[1] if "/" in model else model


def deployment_id(deployment: Mapping[str, Any]) -> str:
    return str((deployment.get("model_info") or {}).get("id", ""))


class ResidencyCache:
    """Each node's last residency view, fetched again once older than `ttl`."""

    def __init__(self, ttl: float = 1.0, timeout: float = 0.5, admin_key: str | None = None) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.admin_key = admin_key
        self._views: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._client: Any = None
        self.fetches = 0
        self.fetch_failures = 0

    def view(self, base: str) -> dict[str, Any] | None:
        got = self._views.get(base)
        return None if got is None else got[1]

    def put(self, base: str, view: dict[str, Any] | None, at: float | None = None) -> None:
        self._views[base] = (time.monotonic() if at is None else at, view)

    async def _fetch(self, base: str) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        self.fetches += 1
        view: dict[str, Any] | None = None
        try:
            response = await self._client.get(f"{base}/admin/residency", headers=headers)
            if response.status_code == 200:
                view = response.json()
        except Exception:  # noqa: BLE001 (an unreachable node is class 6, not an error)
            view = None
        if view is None:
            self.fetch_failures += 1
        self.put(base, view)

    async def refresh(self, bases: Sequence[str]) -> None:
        """Fetches, concurrently, the views of `bases` older than the TTL (one fetch per node at a time)."""
        now = time.monotonic()
        tasks = []
        for base in dict.fromkeys(bases):
            got = self._views.get(base)
            if got is not None and now - got[0] < self.ttl:
                continue
            task = self._fetching.get(base)
            if task is None or task.done():
                task = asyncio.ensure_future(self._fetch(base))
                self._fetching[base] = task
            tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks)

    def set_entry(self, base: str, model_id: str, **fields: Any) -> None:
        """Overwrites fields of the cached entry for the model on that node (the optimistic updates)."""
        view = self.view(base)
        entry = entry_for(view, model_id)
        if isinstance(entry, dict):
            entry.update(fields)


class ModelpoolRouting:
    """The strategy's state: views, in-flight counts per node, counters. Methods are LiteLLM's."""

    def __init__(self, router: Any = None, ttl: float | None = None, timeout: float | None = None) -> None:
        self.router = router
        self.cache = ResidencyCache(
            ttl=float(os.environ.get("MODELPOOL_ROUTING_TTL", "1")) if ttl is None else ttl,
            timeout=float(os.environ.get("MODELPOOL_ROUTING_TIMEOUT", "0.5")) if timeout is None else timeout,
            admin_key=os.environ.get("MODELPOOL_ADMIN_KEY") or None,
        )
        self.in_flight: dict[str, int] = {}
        self.choices_by_class = [0] * 7
        self.refused_locally = 0
        # The open attempt of each request (by litellm_call_id), and of calls without one (by
        # deployment id): node base and model id.
        self._calls: dict[str, tuple[str, str]] = {}
        self._open: dict[str, list[tuple[str, str]]] = {}
        self.stats_file = os.environ.get("MODELPOOL_ROUTING_STATS") or None

    # LiteLLM's CustomRoutingStrategyBase interface.
    async def async_get_available_deployment(
        self,
        model: str,
        messages: list[dict[str, str]] | None = None,
        input: str | list[Any] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        if self.router is None:
            raise RuntimeError("modelpool_routing: no router installed")
        kwargs = request_kwargs if request_kwargs is not None else {}
        healthy = await self.router.async_get_healthy_deployments(
            model=model,
            request_kwargs=kwargs,
            messages=messages,
            input=input,
            specific_deployment=specific_deployment,
        )
        if isinstance(healthy, dict):
            return healthy
        if not healthy:
            return None
        call_id = kwargs.get("litellm_call_id")
        return await self.pick(
            healthy,
            retry=_attempted_retries(kwargs) > 0,
            last_error=_last_error(kwargs),
            call_id=call_id if isinstance(call_id, str) else None,
        )

    def get_available_deployment(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("modelpool_routing is async only (the proxy and Router.acompletion are)")

    async def pick(
        self,
        deployments: Sequence[dict[str, Any]],
        retry: bool = False,
        last_error: str = "",
        call_id: str | None = None,
    ) -> dict[str, Any]:
        """Chooses among `deployments` (one model group, model_list order) and books the choice.

        `call_id` (the proxy's `litellm_call_id`) ties a retry to its request: a second pick for
        the same call means the previous attempt failed (LiteLLM logs one success or failure per
        request, not per attempt), so it ends that attempt first.
        """
        if call_id is not None and call_id in self._calls:
            self._end(*self._calls.pop(call_id), failed=True)
        bases = [node_base(str((d.get("litellm_params") or {}).get("api_base", ""))) for d in deployments]
        await self.cache.refresh(bases)
        model_id = deployment_model_id(deployments[0])
        views = [self.cache.view(b) for b in bases]
        flights = [self.in_flight.get(b, 0) for b in bases]
        index = choose(views, model_id, flights)
        base = bases[index]
        entry = entry_for(views[index], model_id)
        cls = classify(entry)
        if retry and cls == REJECT and all(
            classify(entry_for(v, model_id)) == REJECT and entry_for(v, model_id).get("expected_wait_secs") is None  # type: ignore[union-attr]
            for v in views
        ):
            self.refused_locally += 1
            self._write_stats()
            import litellm

            raise litellm.ServiceUnavailableError(
                message=f"modelpool_routing: every node refuses {model_id} and waiting cannot help "
                f"(residency: reject, no retry hint); not sent again. The node said: {last_error}",
                llm_provider="openai",
                model=model_id,
            )
        if cls in (LOAD_FREE, LOAD_EVICT, QUEUE):
            self.cache.set_entry(base, model_id, decision="join", evict_bytes=0)
        self.choices_by_class[cls] += 1
        self.in_flight[base] = self.in_flight.get(base, 0) + 1
        if call_id is not None:
            self._calls[call_id] = (base, model_id)
        else:
            self._open.setdefault(deployment_id(deployments[index]), []).append((base, model_id))
        return deployments[index]

    def _end(self, base: str, model_id: str, failed: bool) -> None:
        if self.in_flight.get(base, 0) > 0:
            self.in_flight[base] -= 1
        if failed:
            self.cache.set_entry(base, model_id, decision="reject")

    def call_ended(self, call_id: str | None, dep_id: str | None, failed: bool) -> None:
        """A request (or, without a call id, one call to a deployment) ended: one in flight less
        on its node; after a failure that node's entry for the model is `reject` until refreshed."""
        if call_id is not None and call_id in self._calls:
            self._end(*self._calls.pop(call_id), failed=failed)
        else:
            open_calls = self._open.get(dep_id or "")
            if not open_calls:
                return
            self._end(*open_calls.pop(0), failed=failed)
        self._write_stats()

    def stats(self) -> dict[str, Any]:
        return {
            "choices_by_class": dict(zip(("hit", "join", "load", "load_evict", "queue", "reject", "unknown"),
                                         self.choices_by_class)),
            "in_flight": dict(self.in_flight),
            "refused_locally": self.refused_locally,
            "residency_fetches": self.cache.fetches,
            "residency_fetch_failures": self.cache.fetch_failures,
        }

    def _write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = f"{self.stats_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_file)


def _attempted_retries(kwargs: Mapping[str, Any]) -> int:
    for key in ("litellm_metadata", "metadata"):
        meta = kwargs.get(key)
        if isinstance(meta, Mapping) and isinstance(meta.get("attempted_retries"), int):
            return int(meta["attempted_retries"])
    return 0


def _last_error(kwargs: Mapping[str, Any]) -> str:
    """The error of this request's previous attempt, as LiteLLM's retry breadcrumbs record it."""
    for key in ("litellm_metadata", "metadata"):
        meta = kwargs.get(key)
        previous = meta.get("previous_models") if isinstance(meta, Mapping) else None
        if isinstance(previous, (list, tuple)) and previous and isinstance(previous[-1], Mapping):
            return str(previous[-1].get("exception_string", ""))
    return ""


def _call_ref(kwargs: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(litellm_call_id, deployment id) of a finished LiteLLM call."""
    params = kwargs.get("litellm_params") or {}
    info = params.get("model_info") or {}
    dep = info.get("id")
    call_id = kwargs.get("litellm_call_id") or params.get("litellm_call_id")
    return (call_id if isinstance(call_id, str) else None, None if dep is None else str(dep))


def _make_handler() -> Any:
    from litellm.integrations.custom_logger import CustomLogger
    from litellm.router import CustomRoutingStrategyBase

    class Strategy(ModelpoolRouting, CustomRoutingStrategyBase):  # type: ignore[misc]
        """ModelpoolRouting as LiteLLM's CustomRoutingStrategyBase."""

    class ModelpoolRoutingHandler(CustomLogger):  # type: ignore[misc]
        """Installs the strategy on the proxy's router and ends in-flight calls."""

        def __init__(self) -> None:
            super().__init__()
            self.strategy = Strategy()

        def install(self, router: Any) -> None:
            if getattr(router, "_modelpool_routing", None) is self.strategy:
                return
            self.strategy.router = router
            router.set_custom_routing_strategy(self.strategy)
            router._modelpool_routing = self.strategy

        async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> Any:
            from litellm.proxy import proxy_server

            if proxy_server.llm_router is not None:
                self.install(proxy_server.llm_router)
            return data

        async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
            self.strategy.call_ended(*_call_ref(kwargs), failed=False)

        async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
            self.strategy.call_ended(*_call_ref(kwargs), failed=True)

    return ModelpoolRoutingHandler()


def install(router: Any) -> Any:
    """Installs the strategy on a `litellm.Router` (and its callbacks in `litellm.callbacks`)."""
    import litellm

    handler = _make_handler()
    handler.install(router)
    litellm.callbacks.append(handler)
    return handler


def __getattr__(name: str) -> Any:
    # `proxy_handler` is made on first access so that importing the module for `choose` (tests,
    # the fixture) does not import litellm.
    if name == "proxy_handler":
        handler = _make_handler()
        globals()["proxy_handler"] = handler
        return handler
    raise AttributeError(name)
