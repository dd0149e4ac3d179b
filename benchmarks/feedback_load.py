"""Ratings per second through the feedback API: concurrent clients post ratings to ``lm-gym feedback serve``.

Each client is an invited rater posting one rating per item, every request with its own ``Idempotency-Key``;
every tenth request is sent twice (a client retry), and a request that fails (connection refused, 5xx) is
retried with the same key until it is acknowledged. Afterwards the database must hold exactly one rating
per (client, item). ``kill_at`` kills the server (SIGKILL) once that many ratings were acknowledged and
starts it again. Run from the project root: ``python -m benchmarks.feedback_load`` (SQLite and PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.machine import describe_machine
from lm_gym.feedback.schema import Rating
from lm_gym.feedback.store import FeedbackStore, NewItem
from tests.feedback_servers import AppServer, create_database, postgres_cluster

ADMIN = "load-benchmark-admin-token-000"


@dataclass
class LoadResult:
    """What a load run did: acknowledged idempotency keys, requests sent, seconds, server restarts."""

    acknowledged: set = field(default_factory=set)
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    restarts: int = 0

    @property
    def per_second(self) -> float:
        return len(self.acknowledged) / self.seconds


def prepare(store: FeedbackStore, clients: int, ratings: int) -> tuple[list[str], list[int]]:
    """Invite ``clients`` raters and add ``ratings / clients`` items; return their tokens and the item ids."""
    if ratings % clients:
        raise ValueError(f"ratings={ratings} must be a multiple of clients={clients}")
    items = store.add_items([NewItem(f"prompt {i}", f"response {i}") for i in range(ratings // clients)])
    return [store.invite(f"client {c}")[1] for c in range(clients)], items


async def _post(http: aiohttp.ClientSession, body: dict, headers: dict) -> tuple[int | None, str]:
    """(status, text) of one POST, or (None, error) when the connection fails."""
    try:
        async with http.post("/api/ratings", json=body, headers=headers) as answer:
            return answer.status, await answer.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return None, repr(err)


async def _post_until_acknowledged(http: aiohttp.ClientSession, token: str, key: str, item: int,
                                   result: LoadResult, copies: int) -> None:
    body = {"item_id": item, "value": 1 if item % 2 else -1, "comment": key}
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    acknowledged = 0
    while acknowledged < copies:
        result.requests += 1
        status, text = await _post(http, body, headers)
        if status in (200, 201):
            acknowledged += 1
            result.acknowledged.add(key)
            continue
        if status is not None and status < 500:
            raise AssertionError(f"rating {key} refused: {status} {text}")
        result.failures += 1
        await asyncio.sleep(0.05)


async def _client(base_url: str, token: str, number: int, items: list[int], result: LoadResult) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base_url=base_url, timeout=timeout) as http:
        for i, item in enumerate(items):
            copies = 2 if i % 10 == 0 else 1
            await _post_until_acknowledged(http, token, f"c{number}-i{item}", item, result, copies)


async def _watch_and_kill(server: AppServer, result: LoadResult, kill_at: int) -> None:
    while len(result.acknowledged) < kill_at:
        await asyncio.sleep(0.01)
    server.kill()
    await asyncio.sleep(0.5)  # clients find the server gone and retry
    await asyncio.to_thread(server.start)
    result.restarts += 1


async def run_load(server: AppServer, tokens: list[str], items: list[int], kill_at: int | None = None) -> LoadResult:
    """Post one rating per (client, item) through ``server``; kill and restart it at ``kill_at`` acknowledgements."""
    result = LoadResult()
    started = time.perf_counter()
    tasks = [_client(server.url, token, number, items, result) for number, token in enumerate(tokens)]
    if kill_at is not None:
        tasks.append(_watch_and_kill(server, result, kill_at))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    return result


def measure(db_url: str, clients: int, ratings: int, workers: int = 1) -> tuple[LoadResult, int]:
    """One timed run on a fresh database against ``workers`` server processes; return the result and the
    ratings the database then holds."""
    store = FeedbackStore(db_url)
    tokens, items = prepare(store, clients, ratings)
    server = AppServer(db_url, ADMIN, workers=workers)
    server.start()
    try:
        result = asyncio.run(run_load(server, tokens, items))
    finally:
        server.stop()
    stored = store.count(Rating)
    store.close()
    return result, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--ratings", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="server processes (serve --workers)")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    print(f"{args.clients} concurrent clients, {args.ratings} ratings (every tenth request sent twice), "
          f"{args.workers} uvicorn worker(s), client and server on the same machine\n")
    print("| database | ratings stored | requests | seconds | ratings/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory, postgres_cluster() as postgres:
        for name, url in [("SQLite (WAL)", f"sqlite:///{Path(directory) / 'load.db'}"),
                          ("PostgreSQL 15 (loopback)", create_database(postgres, "load"))]:
            result, stored = measure(url, args.clients, args.ratings, args.workers)
            print(f"| {name} | {stored} | {result.requests} | {result.seconds:.2f} | {result.per_second:.0f} |")


if __name__ == "__main__":
    main()
