"""Who is online in a room, across every process, and count updates pushed to members.

Each process keeps its own members per room. With Redis configured, each process also
writes them to a sorted set per room, `<prefix>:presence:<room id>`, one entry per user
per process (anonymous viewers count one per socket) scored by its expiry time; the count
is the set's size after expired entries are dropped. Entries are refreshed well inside
CHAT_PRESENCE_TTL, so the entries of a process that died vanish within the TTL.
Without Redis the process is alone and its local count is the count.

Every CHAT_PRESENCE_INTERVAL the loop writes what changed, reads the counts of its local
rooms in one pipeline and sends `presence {room, online}` to local members of rooms whose
count changed: at most one update per room per interval.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings

from chat import protocol, redis_clients
from monitoring import metrics

if TYPE_CHECKING:
    from chat.hub import Connection, Hub, LocalRoom

logger = logging.getLogger(__name__)


def _presence_key(room_id: int) -> str:
    return f"{settings.CHAT_LAYER_PREFIX}:presence:{room_id}"


def _member_key(conn: Connection) -> str:
    return f"u{conn.user_id}" if conn.user_id is not None else f"a{conn.id}"


class Presence:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.process = uuid.uuid4().hex[:12]
        # room id -> member key -> local sockets with that key
        self.local: dict[int, collections.Counter[str]] = {}
        self.added: dict[int, set[str]] = collections.defaultdict(set)
        self.removed: dict[int, set[str]] = collections.defaultdict(set)
        self.counts: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.next_refresh = 0.0
        self.redis: Any = redis_clients.async_client() if redis_clients.configured() else None

    def _key(self, room_id: int) -> str:
        return _presence_key(room_id)

    def _entry(self, member: str) -> str:
        return f"{member}@{self.process}"

    # --- local membership --------------------------------------------------------------------

    def joined(self, room: LocalRoom, conn: Connection) -> None:
        members = self.local.setdefault(room.id, collections.Counter())
        key = _member_key(conn)
        members[key] += 1
        if members[key] == 1:
            self.added[room.id].add(key)
            self.removed[room.id].discard(key)

    def left(self, room: LocalRoom, conn: Connection) -> None:
        members = self.local.get(room.id)
        if members is None:
            return
        key = _member_key(conn)
        members[key] -= 1
        if members[key] <= 0:
            del members[key]
            self.removed[room.id].add(key)
            self.added[room.id].discard(key)
        if not members:
            del self.local[room.id]
            self.counts.pop(room.id, None)
            self.sent.pop(room.id, None)

    def local_count(self, room_id: int) -> int:
        return len(self.local.get(room_id, ()))

    # --- shared counts -----------------------------------------------------------------------

    async def count(self, room_id: int) -> int:
        """The room's online count now, writing this process's pending changes for it first."""
        if self.redis is None or redis_clients.is_down():
            return self.local_count(room_id)
        pipe = self.redis.pipeline(transaction=False)
        self._queue_changes(pipe, room_id, time.time())
        pipe.zremrangebyscore(self._key(room_id), "-inf", time.time())
        pipe.zcard(self._key(room_id))
        try:
            async with asyncio.timeout(settings.CHAT_REDIS_TIMEOUT):
                results = await pipe.execute()
        except Exception:
            metrics.LAYER_ERRORS.labels("presence").inc()
            self.next_refresh = 0.0
            return self.local_count(room_id)
        count = int(results[-1])
        self.counts[room_id] = count
        return count

    def _queue_changes(self, pipe: Any, room_id: int, now: float) -> None:
        added = self.added.pop(room_id, set())
        removed = self.removed.pop(room_id, set())
        key = self._key(room_id)
        if added:
            expires = now + settings.CHAT_PRESENCE_TTL
            pipe.zadd(key, {self._entry(m): expires for m in added})
            pipe.expire(key, int(settings.CHAT_PRESENCE_TTL * 2))
        if removed:
            pipe.zrem(key, *(self._entry(m) for m in removed))

    async def withdraw(self) -> None:
        """Remove every entry of this process (it is shutting down): counts heal at once."""
        if self.redis is None:
            return
        pipe = self.redis.pipeline(transaction=False)
        for room_id, members in self.local.items():
            if members:
                pipe.zrem(self._key(room_id), *(self._entry(m) for m in members))
        await pipe.execute()
        self.local.clear()

    async def run(self) -> None:
        interval = settings.CHAT_PRESENCE_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.LAYER_ERRORS.labels("presence").inc()
                logger.warning("presence: update failed (%s); retrying next interval", exc)

    async def tick(self) -> None:
        """Write changes, read counts, and push changed counts to local members."""
        if self.redis is not None:
            if redis_clients.is_down():
                return  # counts stay as they were; the probe's recovery brings them back
            await self._sync_redis()
        else:
            self.added.clear()
            self.removed.clear()
            self.counts = {room_id: len(members) for room_id, members in self.local.items()}
        for room_id, count in self.counts.items():
            if self.sent.get(room_id) != count:
                room = self.hub.rooms.get(room_id)
                if room is None:
                    continue
                self.sent[room_id] = count
                self.hub.deliver_local(room_id, protocol.presence(room=room.slug, online=count))

    async def _sync_redis(self) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        if now >= self.next_refresh:
            # Re-announce every local member well before its entry expires.
            self.next_refresh = now + settings.CHAT_PRESENCE_TTL / 3
            for room_id, members in self.local.items():
                self.added[room_id].update(members)
        for room_id in set(self.added) | set(self.removed):
            self._queue_changes(pipe, room_id, now)
        rooms = list(self.local)
        for room_id in rooms:
            pipe.zremrangebyscore(self._key(room_id), "-inf", now)
            pipe.zcard(self._key(room_id))
        try:
            async with asyncio.timeout(settings.CHAT_REDIS_TIMEOUT):
                results = await pipe.execute()
        except Exception:
            # The changes popped above are lost with the pipeline: re-announce everything on
            # the next tick; departed entries expire on their own.
            self.next_refresh = 0.0
            raise
        cards = results[len(results) - 2 * len(rooms) :][1::2]
        self.counts = {room_id: int(card) for room_id, card in zip(rooms, cards, strict=True)}


def online_counts(room_ids: list[int]) -> dict[int, int]:
    """Online counts for a page listing rooms (synchronous: HTTP views).

    Reads Redis when configured; otherwise this process is the only one, and its hubs'
    local counts are the counts. Falls back to zeros when Redis does not answer.
    """
    if not room_ids:
        return {}
    if not redis_clients.configured():
        from chat.hub import all_hubs

        hubs = all_hubs()
        return {rid: sum(h.presence.local_count(rid) for h in hubs) for rid in room_ids}
    client = redis_clients.sync_client()
    now = time.time()
    try:
        with client.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                pipe.zcount(_presence_key(room_id), now, "+inf")
            counts = pipe.execute()
    except Exception:
        metrics.LAYER_ERRORS.labels("presence").inc()
        return dict.fromkeys(room_ids, 0)
    finally:
        client.close()
    return {rid: int(count) for rid, count in zip(room_ids, counts, strict=True)}
