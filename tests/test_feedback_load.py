"""Load and faults on each database: 50 concurrent clients post 5,000 ratings through the served API (every
tenth request retried with its idempotency key), the server is killed (SIGKILL) and restarted half-way, and
afterwards the database holds exactly the 5,000 ratings: every acknowledged one, none twice."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks.feedback_load import ADMIN, prepare, run_load
from lm_gym.feedback.schema import Item, Rating, Signal
from lm_gym.feedback.store import FeedbackStore
from tests.feedback_servers import AppServer

CLIENTS, RATINGS = 50, 5000


def test_no_rating_lost_or_doubled_across_a_server_kill(store_url):
    store = FeedbackStore(store_url)
    tokens, items = prepare(store, CLIENTS, RATINGS)
    server = AppServer(store_url, ADMIN)
    server.start()
    try:
        result = asyncio.run(run_load(server, tokens, items, kill_at=RATINGS // 2))
    finally:
        server.stop()
    assert result.restarts == 1 and result.failures > 0  # the kill really cut requests off
    rows = store.ratings()
    assert len(rows) == RATINGS == len(result.acknowledged)
    assert {r.idempotency_key for r in rows} == result.acknowledged
    assert len({(r.rater_id, r.item_id) for r in rows}) == RATINGS
    assert all(r.comment == r.idempotency_key for r in rows)  # each row holds its own request's text
    assert store.count(Rating) == RATINGS
    store.close()


def test_several_worker_processes_share_one_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(url)
    tokens, items = prepare(store, 4, 40)
    server = AppServer(url, ADMIN, workers=2)
    server.start()
    try:
        result = asyncio.run(run_load(server, tokens, items))
    finally:
        server.stop()
    assert len(result.acknowledged) == 40 == store.count(Rating)
    assert {r.idempotency_key for r in store.ratings()} == result.acknowledged


def test_concurrent_signals_for_new_responses_add_each_item_once(store_url):
    """Eight applications' users like the same ten new responses at the same moment: each response becomes
    one item, and every signal is stored and points at it."""
    store = FeedbackStore(store_url)
    key = store.invite("shop", role="app")[1]
    server = AppServer(store_url, ADMIN)
    server.start()
    responses, barrier = [f"answer {i}" for i in range(10)], threading.Barrier(8)

    def like_all(user: int) -> list[int]:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}) as http:
            barrier.wait()
            answers = [http.post("/api/signals", json={"prompt": "Hi", "response": response, "signal": "like",
                                                       "user": f"user-{user}"}) for response in responses]
        assert [answer.status_code for answer in answers] == [201] * 10, [a.text for a in answers]
        return [answer.json()["item_id"] for answer in answers]

    try:
        with ThreadPoolExecutor(8) as pool:
            item_ids = list(pool.map(like_all, range(8)))
    finally:
        server.stop()
    assert store.count(Item) == 10 and store.count(Signal) == 80
    assert all(ids == item_ids[0] for ids in item_ids) and len(set(item_ids[0])) == 10
    assert sorted(item.response_a for item in store.items()) == sorted(responses)
    store.close()
