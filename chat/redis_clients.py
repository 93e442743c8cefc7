"""Redis connections for presence and abuse limits, from the same settings as the layer.

REDIS_URL names one server; with REDIS_SENTINELS set, clients ask the sentinels for the
current primary of REDIS_SENTINEL_MASTER and follow it across failovers. Every call has
CHAT_REDIS_TIMEOUT as its socket timeout, so a dead or hung Redis fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import Any

import redis
from django.conf import settings
from redis import asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from monitoring import metrics

_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


# Set by the hub's probe (chat.hub) when Redis stops answering, cleared when it answers again.
# Callers on a hot path (posting, limits, presence) skip Redis at once while it is set.
_down_since: float | None = None


def is_down() -> bool:
    return _down_since is not None


def mark_down() -> None:
    global _down_since
    if _down_since is None:
        _down_since = time.monotonic()
        metrics.REDIS_UP.set(0)


def mark_up() -> None:
    global _down_since
    _down_since = None
    metrics.REDIS_UP.set(1)


def configured() -> bool:
    return bool(settings.REDIS_URL or settings.REDIS_SENTINELS)


def _timeouts() -> dict[str, Any]:
    return {
        "socket_timeout": settings.CHAT_REDIS_TIMEOUT,
        "socket_connect_timeout": settings.CHAT_REDIS_TIMEOUT,
    }


def async_client() -> Any:
    """This event loop's client (connections belong to a loop)."""
    loop = asyncio.get_running_loop()
    client = _async.get(loop)
    if client is None:
        if settings.REDIS_SENTINELS:
            sentinel = AsyncSentinel(
                settings.REDIS_SENTINELS, sentinel_kwargs=_timeouts(), **_timeouts()
            )
            client = sentinel.master_for(settings.REDIS_SENTINEL_MASTER, **_timeouts())
        else:
            client = aioredis.Redis.from_url(settings.REDIS_URL, **_timeouts())
        _async[loop] = client
    return client


_shared_sync: Any = None


def shared_sync_client() -> Any:
    """One thread-safe synchronous client for the process (its pool serves every thread)."""
    global _shared_sync
    if _shared_sync is None:
        _shared_sync = sync_client()
    return _shared_sync


def sync_client() -> Any:
    """A client for synchronous code (HTTP views, admin); the caller closes it."""
    if settings.REDIS_SENTINELS:
        sentinel = Sentinel(settings.REDIS_SENTINELS, sentinel_kwargs=_timeouts(), **_timeouts())
        return sentinel.master_for(settings.REDIS_SENTINEL_MASTER, **_timeouts())
    return redis.Redis.from_url(settings.REDIS_URL, **_timeouts())


async def close_async() -> None:
    """Close this loop's client, if one was made (hub shutdown)."""
    client = _async.pop(asyncio.get_running_loop(), None)
    if client is not None:
        # Closing a connection to a dead Redis may fail; there is nothing left to do then.
        with contextlib.suppress(Exception):
            await client.aclose()
