"""Health endpoints for load balancers and orchestrators.

/healthz: the process answers (no dependencies): restart it if this fails.
/readyz: the process can serve chat now: the database answers, Redis answers, and a
message makes the round trip through the channel layer, each within CHAT_REDIS_TIMEOUT.
503 names the failing part. A draining process is not ready, so balancers stop sending
it new sockets.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

from chat import redis_clients
from chat.hub import current_hub, get_hub


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _redis() -> None:
    await redis_clients.async_client().ping()


async def _layer_round_trip() -> None:
    hub = await get_hub()
    await hub.round_trip()


async def _check(name: str, call: Any, failures: dict[str, str], timings: dict[str, float]) -> None:
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.CHAT_REDIS_TIMEOUT):
            await call()
    except TimeoutError:
        failures[name] = f"no answer within {settings.CHAT_REDIS_TIMEOUT} s"
    except Exception as exc:
        failures[name] = f"{type(exc).__name__}: {exc}"[:200]
    timings[name] = round((time.monotonic() - started) * 1000, 1)


@never_cache
async def readyz(request: HttpRequest) -> JsonResponse:
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}
    hub = current_hub()
    if hub is not None and hub.draining:
        failures["process"] = "draining after SIGTERM"
    await _check("database", sync_to_async(_database), failures, timings)
    if redis_clients.configured():
        await _check("redis", _redis, failures, timings)
    await _check("channel_layer", _layer_round_trip, failures, timings)
    body = {"status": "fail" if failures else "ok", "failures": failures, "ms": timings}
    return JsonResponse(body, status=503 if failures else 200)
