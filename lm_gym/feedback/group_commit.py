"""Group commit: the judgements of concurrent API requests stored in shared transactions.

A commit is the expensive part of storing a judgement (a round trip and, on PostgreSQL, a WAL flush to
disk), and each request handled in a worker thread of its own costs a thread hand-off besides. Here a
request awaits :meth:`GroupCommit.record` on the event loop; one writer task takes every judgement that is
waiting, stores them with one :meth:`FeedbackStore.record_many` call in a worker thread (one INSERT, one
commit) and answers each request with its own outcome once that transaction has committed, so nothing is
acknowledged before it is durable. Under light load a batch holds one judgement and adds no wait; under
heavy load the next batch fills while the previous one commits.
"""

from __future__ import annotations

import asyncio

import anyio

from lm_gym.feedback.schema import Rating
from lm_gym.feedback.store import FeedbackStore, JudgementRequest

MAX_BATCH = 256


class GroupCommit:
    """Stores judgements from concurrent requests of one event loop in shared transactions.

    :param store: the feedback store.
    :param max_batch: the most judgements in one transaction.
    """

    def __init__(self, store: FeedbackStore, max_batch: int = MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.store, self.max_batch = store, max_batch
        self._waiting: list[tuple[JudgementRequest, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def record(self, request: JudgementRequest) -> tuple[Rating, bool]:
        """Store ``request`` with those waiting alongside it; return or raise as :meth:`FeedbackStore.record`."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _write_waiting(self) -> None:
        """Write batches until nothing waits (requests that arrive meanwhile join the next batch)."""
        while self._waiting:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
            try:
                outcomes = await anyio.to_thread.run_sync(self.store.record_many, [request for request, _ in batch])
            except Exception as err:  # the database failed: every request of the batch gets the error
                outcomes = [err] * len(batch)
            for (_, future), outcome in zip(batch, outcomes):
                if not future.done():  # a request whose client went away was cancelled
                    future.set_result(outcome)
