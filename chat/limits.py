"""Abuse limits on posting, the same on every process: rate, slow mode, repeated messages.

With Redis configured the state lives there, so a player who spreads messages over two
processes meets one limit; without Redis the one process keeps it in memory. Each refusal
is a ChatError carrying `retry_after_ms`. If Redis fails to answer, posting is allowed
(and counted in chat_layer_errors_total): the post itself then meets the same outage.

- rate: at most CHAT_RATE_MESSAGES per CHAT_RATE_WINDOW_SECONDS per user, sliding window
  (CHAT_RATE_MESSAGES_MODERATOR for moderators). A Redis sorted set of post times per user:
  a post adds itself, counts, and takes itself back out when over the limit, so concurrent
  posts on several processes can only ever be refused together, never admitted together.
- slow mode: one post per room's slow_mode_seconds per user (moderators exempt).
- repeat: the same text again in the same room within CHAT_REPEAT_WINDOW_SECONDS.

While the hub's probe finds Redis down, each process falls back to its own in-memory
limits rather than waiting on Redis for every post.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import time
import uuid
from typing import Any

from django.conf import settings

from chat import redis_clients
from chat.errors import ChatError
from chat.protocol import ErrorCode
from monitoring import metrics

logger = logging.getLogger(__name__)


def _refuse(code: ErrorCode, detail: str, retry_after: float) -> ChatError:
    metrics.RATE_LIMITED.labels(code.value).inc()
    return ChatError(code, detail, retry_after_ms=max(1, math.ceil(retry_after * 1000)))


def _digest(body: str) -> str:
    return hashlib.blake2b(body.casefold().encode(), digest_size=12).hexdigest()


def check_post(
    *, user_id: int, room_id: int, body: str, moderator: bool, slow_mode_seconds: int
) -> None:
    """Raise ChatError if this post breaks a limit; otherwise record it against them.

    Synchronous: it runs in the posting thread, next to the database work, with Redis
    socket timeouts of CHAT_REDIS_TIMEOUT.
    """
    if redis_clients.configured() and not redis_clients.is_down():
        try:
            _check_redis(
                user_id=user_id,
                room_id=room_id,
                body=body,
                moderator=moderator,
                slow_mode_seconds=slow_mode_seconds,
            )
        except ChatError:
            raise
        except Exception:
            metrics.LAYER_ERRORS.labels("limits").inc()
            logger.warning("limits: Redis did not answer; allowing the post", exc_info=True)
        return
    _local.check(
        user_id=user_id,
        room_id=room_id,
        body=body,
        moderator=moderator,
        slow_mode_seconds=slow_mode_seconds,
    )


def _rate_limit(moderator: bool) -> int:
    return settings.CHAT_RATE_MESSAGES_MODERATOR if moderator else settings.CHAT_RATE_MESSAGES


def _check_redis(
    *, user_id: int, room_id: int, body: str, moderator: bool, slow_mode_seconds: int
) -> None:
    redis: Any = redis_clients.shared_sync_client()
    prefix = settings.CHAT_LAYER_PREFIX
    if slow_mode_seconds > 0 and not moderator:
        key = f"{prefix}:slow:{room_id}:{user_id}"
        if not redis.set(key, 1, nx=True, px=slow_mode_seconds * 1000):
            remaining = redis.pttl(key)
            raise _refuse(
                ErrorCode.SLOW_MODE,
                f"slow mode: one message every {slow_mode_seconds} s",
                max(remaining, 1) / 1000,
            )
    repeat_window = settings.CHAT_REPEAT_WINDOW_SECONDS
    if repeat_window > 0 and not moderator:
        key = f"{prefix}:repeat:{room_id}:{user_id}"
        digest = _digest(body)
        previous = redis.set(key, digest, px=repeat_window * 1000, get=True)
        if previous is not None and previous.decode() == digest:
            raise _refuse(
                ErrorCode.REPEATED, "you just said that; say something new", repeat_window
            )
    window = settings.CHAT_RATE_WINDOW_SECONDS
    limit = _rate_limit(moderator)
    key = f"{prefix}:rate:{user_id}"
    now = time.time()
    member = uuid.uuid4().hex
    with redis.pipeline(transaction=True) as pipe:
        pipe.zremrangebyscore(key, "-inf", now - window)
        pipe.zadd(key, {member: now})
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        pipe.expire(key, window + 1)
        _, _, count, oldest, _ = pipe.execute()
    if count > limit:
        redis.zrem(key, member)
        retry = (oldest[0][1] + window - now) if oldest else window
        raise _refuse(ErrorCode.RATE_LIMITED, f"at most {limit} messages every {window} s", retry)


class _LocalLimits:
    """The same limits for a single process without Redis."""

    def __init__(self) -> None:
        self.posts: dict[int, collections.deque[float]] = {}
        self.slow_until: dict[tuple[int, int], float] = {}
        self.last_body: dict[tuple[int, int], tuple[str, float]] = {}

    def check(
        self, *, user_id: int, room_id: int, body: str, moderator: bool, slow_mode_seconds: int
    ) -> None:
        now = time.monotonic()
        self._sweep(now)
        where = (room_id, user_id)
        if slow_mode_seconds > 0 and not moderator:
            until = self.slow_until.get(where, 0.0)
            if until > now:
                raise _refuse(
                    ErrorCode.SLOW_MODE,
                    f"slow mode: one message every {slow_mode_seconds} s",
                    until - now,
                )
            self.slow_until[where] = now + slow_mode_seconds
        repeat_window = settings.CHAT_REPEAT_WINDOW_SECONDS
        if repeat_window > 0 and not moderator:
            digest = _digest(body)
            previous = self.last_body.get(where)
            self.last_body[where] = (digest, now + repeat_window)
            if previous is not None and previous[0] == digest and previous[1] > now:
                raise _refuse(
                    ErrorCode.REPEATED, "you just said that; say something new", repeat_window
                )
        window = settings.CHAT_RATE_WINDOW_SECONDS
        limit = _rate_limit(moderator)
        posts = self.posts.setdefault(user_id, collections.deque())
        while posts and posts[0] <= now - window:
            posts.popleft()
        if len(posts) >= limit:
            raise _refuse(
                ErrorCode.RATE_LIMITED,
                f"at most {limit} messages every {window} s",
                posts[0] + window - now,
            )
        posts.append(now)

    def _sweep(self, now: float) -> None:
        """Forget expired state now and then, so idle users cost nothing."""
        if len(self.posts) + len(self.slow_until) + len(self.last_body) < 10_000:
            return
        window = settings.CHAT_RATE_WINDOW_SECONDS
        self.posts = {u: p for u, p in self.posts.items() if p and p[-1] > now - window}
        self.slow_until = {k: t for k, t in self.slow_until.items() if t > now}
        self.last_body = {k: v for k, v in self.last_body.items() if v[1] > now}


_local = _LocalLimits()


def reset_local() -> None:
    """Forget in-process limit state (tests)."""
    global _local
    _local = _LocalLimits()
