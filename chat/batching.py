"""Database work from the event loop, batched.

Each process runs its database calls on one thread. A storm of sockets that each need the
same kind of work (a connect's profile, a join's room and history, a post's insert) would
queue one thread hop, one connection and one commit each. A Batcher runs one call at a time
for everything submitted while the previous call ran: the hops, connections and commits are
paid per batch, a lone request waits for nothing, and each caller gets its own outcome.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from channels.db import database_sync_to_async

from chat.errors import ChatError
from chat.protocol import ErrorCode
from monitoring import metrics

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class _Queue(Generic[Item, Outcome]):
    __slots__ = ("running", "waiting")

    def __init__(self) -> None:
        self.waiting: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self.running: asyncio.Task[None] | None = None


class Batcher(Generic[Item, Outcome]):
    """`await batcher.submit(item)`: the outcome of `run(items)` for this item.

    `run` is a synchronous function over a list of items that returns one outcome per item,
    in order; an outcome that is a ChatError is raised to that item's caller alone. If `run`
    itself raises, every caller of that batch gets the exception. Batches hold at most `limit`
    items. State is per event loop (futures belong to one loop).
    """

    def __init__(
        self,
        kind: str,
        run: Callable[[list[Item]], Sequence[Outcome | ChatError]],
        *,
        limit: int = 500,
    ) -> None:
        self.kind = kind
        self.run = run
        self.limit = limit
        self._sizes = metrics.DB_BATCH_SIZE.labels(kind)
        self._queues: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Queue[Item, Outcome]
        ] = weakref.WeakKeyDictionary()

    async def submit(self, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[Outcome] = loop.create_future()
        queue.waiting.append((item, future))
        if queue.running is None:
            queue.running = loop.create_task(self._drain(queue), name=f"chat-batch-{self.kind}")
        return await future

    async def _drain(self, queue: _Queue[Item, Outcome]) -> None:
        try:
            while queue.waiting:
                batch = queue.waiting[: self.limit]
                del queue.waiting[: self.limit]
                self._sizes.observe(len(batch))
                try:
                    outcomes = await database_sync_to_async(self.run)([item for item, _ in batch])
                except Exception as exc:
                    logger.warning("chat: a batch of %d %s failed", len(batch), self.kind)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue  # its caller went away (the socket closed)
                    if isinstance(outcome, ChatError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            queue.running = None
            # Cancelled (the loop is closing): nobody must wait for a batch that never runs.
            stranded, queue.waiting = queue.waiting, []
            for _, future in stranded:
                if not future.done():
                    future.set_exception(ChatError(ErrorCode.UNAVAILABLE, "retry shortly"))
