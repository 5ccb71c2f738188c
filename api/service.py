"""What the REST service does with the contract's requests, apart from HTTP: parse them (resolving
`cluster.profile` among stored profiles only), estimate, search (memoized; in worker processes) and store
searches.

No FastAPI here; api/routes/ translate between this and HTTP.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

from api.commands import estimate as commands
from api.errors import InputError
from api.search_pool import SearchAnswer, SearchPool, search_answer
from api.store import ApiStore, PlanRow, Retention, dumps, new_id, utc_now
from planner.profiles import ProfileError
from planner.request import EstimateRequest, PlanRequest
from planner.specs import HardwareProfile
from profiler.store import is_profile_id


def stored_profile_resolver(store: ApiStore) -> Any:
    """`cluster.profile` -> a stored profile. The service never reads a file a request names: only ids."""

    def resolve(ref: str) -> HardwareProfile:
        if not is_profile_id(ref):
            message = f"{ref!r} is not a stored profile id (32 hex digits); the service does not read files"
            raise ProfileError(message, "cluster.profile")
        return store.profiles.get(ref.lower())

    return resolve


def parse_estimate(body: dict[str, Any], store: ApiStore) -> EstimateRequest:
    return commands.parse(body, "estimate", stored_profile_resolver(store))


def estimate(body: dict[str, Any], store: ApiStore) -> dict[str, Any]:
    return commands.estimate(body, stored_profile_resolver(store))[1].model_dump(mode="json")


def timeline(body: dict[str, Any], store: ApiStore) -> dict[str, Any]:
    return commands.timeline(body, stored_profile_resolver(store)).model_dump(mode="json")


def _answered(answer: SearchAnswer) -> Future[SearchAnswer]:
    done: Future[SearchAnswer] = Future()
    done.set_result(answer)
    return done


class PlanSearches:
    """Plan searches, memoized: a search is a pure function of its parsed request (a stored profile never
    changes), and teams post the same search again and again (CI pipelines, notebooks re-run). Concurrent
    identical searches run once; the others wait for its answer instead of computing it again. Distinct searches
    run side by side in `pool`'s worker processes."""

    def __init__(
        self, store: ApiStore, capacity: int = 256, keep: Retention | None = None, pool: SearchPool | None = None
    ):
        """`capacity`: answers memoized; `keep`: which stored searches are kept (the newest; None: all); `pool`:
        where searches run (None: in the calling thread)."""
        self._store, self._capacity, self._keep = store, capacity, keep
        self.pool = pool or SearchPool(workers=0)
        self._results: OrderedDict[str, SearchAnswer] = OrderedDict()  # by the parsed request's JSON
        self._in_flight: dict[str, Future[SearchAnswer]] = {}
        self._lock = threading.Lock()

    def search(self, body: dict[str, Any]) -> tuple[PlanRequest, SearchAnswer]:
        """The parsed request and its answer (waits for it)."""
        request, answer = self.submit(body)
        return request, answer.result()

    def submit(self, body: dict[str, Any]) -> tuple[PlanRequest, Future[SearchAnswer]]:
        """The parsed request (bad input raises here) and its answer to come: remembered, already running for
        an identical request, or started now."""
        request = commands.parse(body, "plan", stored_profile_resolver(self._store))
        key = json.dumps(request.model_dump(mode="json"), sort_keys=True)
        with self._lock:
            cached = self._cached(key)
            running = None if cached else self._in_flight.get(key)
            fresh = cached is None and running is None
            if fresh:
                running = self._in_flight[key] = Future()
        if cached is not None:
            return request, _answered(cached)
        assert running is not None
        if fresh:
            self.pool.submit(search_answer, request).add_done_callback(functools.partial(self._settle, key, running))
        return request, running

    def _settle(self, key: str, running: Future[SearchAnswer], done: Future[SearchAnswer]) -> None:
        """Remember a search's answer (not its failure: the next identical request tries again), then hand it to
        everyone waiting."""
        error = done.exception()
        with self._lock:
            if error is None:
                self._remember(key, done.result())
            self._in_flight.pop(key, None)
        if error is None:
            running.set_result(done.result())
        else:
            running.set_exception(error)

    def _cached(self, key: str) -> SearchAnswer | None:
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
        return found

    def _remember(self, key: str, result: SearchAnswer) -> None:
        self._results[key] = result
        while len(self._results) > self._capacity:
            self._results.popitem(last=False)

    def store(self, body: dict[str, Any], request: PlanRequest, answer: SearchAnswer) -> PlanRow:
        """Keep a search (the request as posted, and its answer) under a new id."""
        request_text = dumps(body)
        row = PlanRow(
            id=new_id(),
            created=utc_now(),
            model_name=request.model.name or "(custom)",
            num_gpus=request.cluster.num_gpus,
            found=answer.found,
            best_step_time_s=answer.best_step_time_s,
            request=request_text,
            result=answer.json,
            stored_bytes=PlanRow.size_of(request_text, answer.json),
        )
        return self._store.add_plan(row, keep=self._keep)


def stored_plan_request(store: ApiStore, plan_id: str, rank: int, rank_field: str = "plan_rank") -> dict[str, Any]:
    """The contract request (with `plan`) of the `rank`-th plan of stored search `plan_id`; InputError naming
    `plan_id` or the request's `rank_field`."""
    row = store.get_plan(plan_id)
    if row is None:
        raise InputError.at("plan_id", f"no stored plan search with id {plan_id!r}")
    ranked = json.loads(row.result)["plans"]
    if not ranked:
        raise InputError.at("plan_id", f"plan search {plan_id} found no plan that fits; there is nothing to run")
    if rank > len(ranked):
        raise InputError.at(rank_field, f"plan search {plan_id} ranked {len(ranked)} plan(s), not {rank}")
    searched = json.loads(row.request)
    return {key: searched[key] for key in ("model", "training", "cluster")} | {"plan": ranked[rank - 1]["plan"]}
