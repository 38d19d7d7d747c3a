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
- Home order: a model's rendezvous order over the deployments of its group (all of them, in
  model_list order, cooling down or not): with `key` = FNV-1a 64 of the model id, position p
  ranks by `mix64(key ^ mix64(p))` descending (ties by p; mix64 = SplitMix64's finalizer). A
  candidate's home_rank is its position's place in that order (0: the model's home).
- Choose the candidate with the smallest tuple
  (class, home_rank if class is 2 or 3 else 0, evict_bytes, expected_wait_secs (null = +inf),
  router_in_flight[node], index). For class 6 evict_bytes and expected_wait_secs count as 0 and
  +inf. So a model held somewhere goes there (the least busy copy), and a model held nowhere
  is loaded at the first node of its home order that can load it (free memory first): reloads
  land on the same node instead of spreading copies.
- Right after choosing: if the class was 2, 3 or 4, that node's cached entry for the model
  becomes `join` (evict_bytes 0, expected_wait_secs kept); the router's in-flight count for the
  node goes up by one. It goes down when the call ends (success or failure). A call that fails
  turns that node's cached entry for the model into `reject` with evict_bytes 0 and
  expected_wait_secs = the refusal's `Retry-After` (null without one, or when LiteLLM does not
  say) until the next refresh, so a retry does not go back to the node that just refused
  (unless every other candidate is worse still).
- Views older than the TTL (default 1 s) are fetched again when a request needs them,
  concurrently across nodes, with a short timeout (default 0.5 s); a failed fetch leaves no view
  (class 6) until the next refresh.

Beyond the rule (the simulator has no counterpart), one guard: on a retry (LiteLLM's
`attempted_retries` > 0), when every candidate is class 5 with `expected_wait_secs` null and
each of those entries says waiting cannot help (the node's own view, or a refusal that came with
`x-should-retry: false`; e.g. `model_too_large` on every node), the strategy raises a 503 itself
instead of sending the request again: LiteLLM retries every 5xx and reads neither
`x-should-retry` nor `error.code`, so without this a never-succeeding refusal costs the nodes
`num_retries + 1` requests; with it, one.

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


_MASK = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's finalizer (64-bit wrapping arithmetic)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def fnv1a(s: str) -> int:
    """FNV-1a 64 of the UTF-8 bytes of `s`."""
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & _MASK
    return h


def home_order(model_id: str, n: int) -> list[int]:
    """The model's rendezvous order of positions 0..n-1 (the first is its home)."""
    key = fnv1a(model_id)
    return sorted(range(n), key=lambda p: (-mix64(key ^ mix64(p)), p))


def home_ranks(model_id: str, n: int) -> list[int]:
    """home_ranks[p]: position p's place in the model's home order."""
    ranks = [0] * n
    for r, p in enumerate(home_order(model_id, n)):
        ranks[p] = r
    return ranks


def sort_key(
    view: View | None, model_id: str, in_flight: int, index: int, home_rank: int = 0
) -> tuple[int, int, int, float, int, int]:
    """The tuple the rule minimises for one candidate."""
    entry = entry_for(view, model_id)
    cls = classify(entry)
    if entry is None or cls == UNKNOWN:
        return (cls, 0, 0, math.inf, in_flight, index)
    wait = entry.get("expected_wait_secs")
    rank = home_rank if cls in (LOAD_FREE, LOAD_EVICT) else 0
    evict = int(entry.get("evict_bytes") or 0)
    return (cls, rank, evict, math.inf if wait is None else float(wait), in_flight, index)


def choose(
    views: Sequence[View | None],
    model_id: str,
    in_flight: Sequence[int],
    home_rank: Sequence[int] | None = None,
) -> int:
    """Index of the candidate to send a request for `model_id` to (the rule in the module doc).

    `views[i]` is candidate i's residency view (`GET /admin/residency` JSON) or None;
    `in_flight[i]` the router's open calls to that node; `home_rank[i]` its place in the model's
    home order (all 0 when omitted).
    """
    if not views:
        raise ValueError("choose: no candidates")
    ranks = [0] * len(views) if home_rank is None else list(home_rank)
    if not (len(views) == len(in_flight) == len(ranks)):
        raise ValueError("choose: views, in_flight and home_rank differ in length")
    return min(range(len(views)), key=lambda i: sort_key(views[i], model_id, in_flight[i], i, ranks[i]))


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


class Attempt:
    """One call the strategy sent: to which deployment and node, for which request."""

    __slots__ = ("call_id", "dep_id", "base", "model_id")

    def __init__(self, call_id: str | None, dep_id: str, base: str, model_id: str) -> None:
        self.call_id, self.dep_id, self.base, self.model_id = call_id, dep_id, base, model_id


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
        self.open: list[Attempt] = []
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
            group=self._group(healthy),
            retry=_attempted_retries(kwargs) > 0,
            last_error=_last_error(kwargs),
            call_id=call_id if isinstance(call_id, str) else None,
        )

    def get_available_deployment(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("modelpool_routing is async only (the proxy and Router.acompletion are)")

    def _group(self, healthy: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """Every deployment of the candidates' model group, in model_list order (home order's base)."""
        getter = getattr(self.router, "get_model_list", None)
        group = getter(model_name=healthy[0].get("model_name")) if getter is not None else None
        return group if group else healthy

    async def pick(
        self,
        deployments: Sequence[dict[str, Any]],
        group: Sequence[dict[str, Any]] | None = None,
        retry: bool = False,
        last_error: str = "",
        call_id: str | None = None,
    ) -> dict[str, Any]:
        """Chooses among `deployments` (candidates of one model group, model_list order; `group`:
        all of the group's deployments, default the candidates) and books the choice.

        `call_id` (the proxy's `litellm_call_id`) ties a retry to its request: a new pick for a
        request whose attempt is still open means that attempt failed without its failure event
        having arrived (the proxy logs a request's failure once), so it ends that attempt first.
        """
        for a in [a for a in self.open if call_id is not None and a.call_id == call_id]:
            self._end(a, failed=True, retry_after=None, never=False)
        bases = [node_base(str((d.get("litellm_params") or {}).get("api_base", ""))) for d in deployments]
        await self.cache.refresh(bases)
        model_id = deployment_model_id(deployments[0])
        positions = {deployment_id(d): p for p, d in enumerate(group or deployments)}
        ranks_by_position = home_ranks(model_id, len(positions))
        ranks = [ranks_by_position[positions[deployment_id(d)]] if deployment_id(d) in positions else len(positions)
                 for d in deployments]
        views = [self.cache.view(b) for b in bases]
        flights = [self.in_flight.get(b, 0) for b in bases]
        index = choose(views, model_id, flights, ranks)
        base = bases[index]
        cls = classify(entry_for(views[index], model_id))
        if retry and all(_never_succeeds(entry_for(v, model_id)) for v in views):
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
        self.open.append(Attempt(call_id, deployment_id(deployments[index]), base, model_id))
        return deployments[index]

    def _end(self, a: Attempt, failed: bool, retry_after: float | None, never: bool) -> None:
        self.open.remove(a)
        if self.in_flight.get(a.base, 0) > 0:
            self.in_flight[a.base] -= 1
        if failed:
            # What the router learnt from the refusal, until the node's next view. A node whose
            # own view already said that waiting cannot help keeps saying so.
            entry = entry_for(self.cache.view(a.base), a.model_id)
            from_view = _never_succeeds(entry) and not (entry or {}).get("learned")
            self.cache.set_entry(a.base, a.model_id, decision="reject", evict_bytes=0,
                                 expected_wait_secs=retry_after, learned=not from_view, never=never)
        self._write_stats()

    def call_ended(
        self,
        call_id: str | None,
        dep_id: str | None,
        failed: bool,
        retry_after: float | None = None,
        never: bool = False,
    ) -> None:
        """LiteLLM says a call to deployment `dep_id` ended: one in flight less on its node; after
        a failure that node's entry for the model is `reject` (`retry_after` as its wait; `never`:
        the reply said `x-should-retry: false`) until the next view. An end that matches no open
        attempt (already ended by a retry's pick) changes nothing."""
        match = [a for a in self.open if a.dep_id == dep_id and call_id is not None and a.call_id == call_id]
        match = match or [a for a in self.open if a.dep_id == dep_id and a.call_id is None]
        if match:
            self._end(match[0], failed, retry_after, never)

    def stats(self) -> dict[str, Any]:
        return {
            "choices_by_class": dict(zip(("hit", "join", "load", "load_evict", "queue", "reject", "unknown"),
                                         self.choices_by_class)),
            "in_flight": dict(self.in_flight),
            "open_attempts": len(self.open),
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


def _never_succeeds(entry: Mapping[str, Any] | None) -> bool:
    """A `reject` without a retry hint that waiting cannot cure: the node's own view says so, or
    the refusal the router learnt it from carried `x-should-retry: false`."""
    return (
        entry is not None
        and classify(entry) == REJECT
        and entry.get("expected_wait_secs") is None
        and (not entry.get("learned") or bool(entry.get("never")))
    )


def _refusal(kwargs: Mapping[str, Any]) -> tuple[float | None, bool]:
    """(Retry-After seconds, x-should-retry: false) of a failed call's reply, when LiteLLM kept it."""
    error = kwargs.get("exception")
    headers = getattr(error, "litellm_response_headers", None) or getattr(
        getattr(error, "response", None), "headers", None
    )
    if headers is None:
        return None, False
    get = headers.get
    retry_after: float | None = None
    try:
        value = get("retry-after") or get("llm_provider-retry-after")
        retry_after = float(value) if value is not None else None
    except (TypeError, ValueError):
        retry_after = None
    never = str(get("x-should-retry") or get("llm_provider-x-should-retry") or "").lower() == "false"
    return retry_after, never


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
            retry_after, never = _refusal(kwargs)
            self.strategy.call_ended(*_call_ref(kwargs), failed=True, retry_after=retry_after, never=never)

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
