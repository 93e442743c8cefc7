"""Abuse limits on posting, the same on every process: rate, slow mode, repeated messages.

With Redis configured the state lives there, so a player who spreads messages over two
processes meets one limit; without Redis the one process keeps it in memory. Each refusal
is a ChatError carrying `retry_after_ms`. If Redis fails to answer, posting is allowed
(and counted in chat_layer_errors_total): the post itself then meets the same outage.

- rate: at most CHAT_RATE_MESSAGES per CHAT_RATE_WINDOW_SECONDS per user, sliding window
  (CHAT_RATE_MESSAGES_MODERATOR for moderators). A Redis sorted set of post times per user,
  checked and added to by one script, so posts on several processes are counted atomically.
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
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Post:
    """What the limits need to know about one post."""

    user_id: int
    room_id: int
    body: str
    moderator: bool
    slow_mode_seconds: int


def check_posts(posts: list[Post]) -> list[ChatError | None]:
    """For each post, in order: the ChatError of the limit it breaks, or None once it has
    been recorded against the limits.

    Synchronous: it runs in the posting thread, next to the database work. With Redis, the
    whole batch is one round trip (one script call per post, pipelined), with socket
    timeouts of CHAT_REDIS_TIMEOUT.
    """
    if redis_clients.configured() and not redis_clients.is_down():
        try:
            return _check_redis(posts)
        except Exception:
            metrics.LAYER_ERRORS.labels("limits").inc()
            logger.warning("limits: Redis did not answer; allowing the posts", exc_info=True)
            return [None] * len(posts)
    refusals: list[ChatError | None] = []
    for post in posts:
        try:
            _local.check(post)
            refusals.append(None)
        except ChatError as exc:
            refusals.append(exc)
    return refusals


def _rate_limit(moderator: bool) -> int:
    return settings.CHAT_RATE_MESSAGES_MODERATOR if moderator else settings.CHAT_RATE_MESSAGES


# The three limits of one post, atomically, in one call. Returns {0, 0} when the post may go
# (and is then counted), else {limit, retry after in ms}: 1 slow mode, 2 repeated, 3 rate.
# A refused post is not counted against the rate; the slow-mode mark, once set, stays.
_LIMITS_SCRIPT = """
local slow_ms = tonumber(ARGV[1])
if slow_ms > 0 and not redis.call('SET', KEYS[1], 1, 'NX', 'PX', slow_ms) then
  return {1, redis.call('PTTL', KEYS[1])}
end
local repeat_ms = tonumber(ARGV[2])
if repeat_ms > 0 then
  local previous = redis.call('SET', KEYS[2], ARGV[3], 'PX', repeat_ms, 'GET')
  if previous == ARGV[3] then
    return {2, repeat_ms}
  end
end
local now, window, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
if redis.call('ZCARD', KEYS[3]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {3, math.ceil((tonumber(oldest[2]) + window - now) * 1000)}
end
redis.call('ZADD', KEYS[3], now, ARGV[7])
redis.call('EXPIRE', KEYS[3], window + 1)
return {0, 0}
"""


def _check_redis(posts: list[Post]) -> list[ChatError | None]:
    redis: Any = redis_clients.shared_sync_client()
    script = _script(redis)
    prefix = settings.CHAT_LAYER_PREFIX
    window = settings.CHAT_RATE_WINDOW_SECONDS
    repeat_ms = settings.CHAT_REPEAT_WINDOW_SECONDS * 1000
    now = time.time()
    with redis.pipeline(transaction=False) as pipe:
        for post in posts:
            keys = [
                f"{prefix}:slow:{post.room_id}:{post.user_id}",
                f"{prefix}:repeat:{post.room_id}:{post.user_id}",
                f"{prefix}:rate:{post.user_id}",
            ]
            exempt = post.moderator
            arguments = [
                0 if exempt else post.slow_mode_seconds * 1000,
                0 if exempt else repeat_ms,
                _digest(post.body),
                repr(now),
                window,
                _rate_limit(post.moderator),
                uuid.uuid4().hex,
            ]
            script(keys=keys, args=arguments, client=pipe)
        answers = pipe.execute()
    refusals: list[ChatError | None] = []
    for post, (kind, retry_ms) in zip(posts, answers, strict=True):
        retry = max(int(retry_ms), 1) / 1000
        if kind == 1:
            refusals.append(
                _refuse(
                    ErrorCode.SLOW_MODE,
                    f"slow mode: one message every {post.slow_mode_seconds} s",
                    retry,
                )
            )
        elif kind == 2:
            refusals.append(
                _refuse(ErrorCode.REPEATED, "you just said that; say something new", retry)
            )
        elif kind == 3:
            limit = _rate_limit(post.moderator)
            refusals.append(
                _refuse(ErrorCode.RATE_LIMITED, f"at most {limit} messages every {window} s", retry)
            )
        else:
            refusals.append(None)
    return refusals


_scripts: dict[int, Any] = {}


def _script(redis: Any) -> Any:
    """The limits script registered with this client (redis-py loads it on first use)."""
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(_LIMITS_SCRIPT)
    return script


class _LocalLimits:
    """The same limits for a single process without Redis."""

    def __init__(self) -> None:
        self.posts: dict[int, collections.deque[float]] = {}
        self.slow_until: dict[tuple[int, int], float] = {}
        self.last_body: dict[tuple[int, int], tuple[str, float]] = {}

    def check(self, post: Post) -> None:
        user_id, room_id, body = post.user_id, post.room_id, post.body
        moderator, slow_mode_seconds = post.moderator, post.slow_mode_seconds
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
