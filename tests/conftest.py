"""Shared fixtures: a throwaway Redis, users with tokens, server processes, clean hubs."""

from __future__ import annotations

import functools
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from channels.layers import channel_layers
from django.contrib.auth.hashers import make_password
from django.db import connection, connections

from chat import hub as hub_module
from chat import limits, redis_clients
from chat.auth import token_issue
from chat.models import Room
from tests.support import RedisServer, ServerProcess

# The test process must not keep database connections in its worker threads: the test
# database is dropped at the end of the session, which PostgreSQL refuses while any session is
# still connected. (Server processes started by tests keep the production default; they exit
# before the drop.)
connections.settings["default"]["CONN_MAX_AGE"] = 0

IN_MEMORY_LAYERS = {
    "default": {
        "BACKEND": "channels.layers.InMemoryChannelLayer",
        "CONFIG": {"capacity": 100_000, "expiry": 60, "group_expiry": 10 * 365 * 86400},
    }
}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when the environment provides one, else a redis-server of our own."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _layers(request: pytest.FixtureRequest, settings: Any) -> Iterator[None]:
    """In-process tests use the in-memory layer, or Redis when marked `redis`."""
    if request.node.get_closest_marker("redis"):
        url = request.getfixturevalue("redis_url")
        settings.REDIS_URL = url
        settings.CHAT_LAYER_PREFIX = f"t{uuid.uuid4().hex[:8]}"
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
                "CONFIG": {"hosts": [url], "prefix": settings.CHAT_LAYER_PREFIX},
            }
        }
    else:
        settings.REDIS_URL = ""
        settings.CHANNEL_LAYERS = IN_MEMORY_LAYERS
    channel_layers.backends.clear()
    limits.reset_local()
    redis_clients.mark_up()
    # In-process hubs run in pytest's main thread: SIGTERM stays pytest's.
    settings.CHAT_DRAIN_ON_SIGTERM = False
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
async def _hub_stopped() -> AsyncIterator[None]:
    """Each test's event loop gets its own hub; stop it with the test."""
    yield
    hub = hub_module.current_hub()
    if hub is not None:
        await hub.stop()


_names = itertools.count()


@functools.cache
def _hashed(password: str) -> str:
    """Hash each test password once: the real hasher takes most of a second per call."""
    return make_password(password)


@pytest.fixture
def make_user(django_user_model: Any) -> Callable[..., tuple[Any, str]]:
    """Create a user; returns (user, socket token)."""

    def make(username: str | None = None, password: str = "pw-for-tests-only") -> tuple[Any, str]:
        name = username or f"player{next(_names)}"
        user = django_user_model.objects.create(username=name, password=_hashed(password))
        return user, token_issue(user_id=user.pk, username=name)

    return make


@pytest.fixture
def make_room() -> Callable[..., Room]:
    def make(slug: str | None = None, **fields: Any) -> Room:
        slug = slug or f"room{next(_names)}"
        return Room.objects.create(slug=slug, title=fields.pop("title", slug.title()), **fields)

    return make


def _database_url() -> str:
    info = connection.settings_dict
    if info["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{info['NAME']}"
    user = info.get("USER") or "postgres"
    host, port = info.get("HOST") or "127.0.0.1", info.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{info['NAME']}"


@pytest.fixture
def server_env(transactional_db: None, redis_url: str) -> dict[str, str]:
    """Environment for server processes sharing this test's database and Redis."""
    return {
        "DJANGO_SETTINGS_MODULE": "esports_chat.settings",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": redis_url,
        "CHAT_LAYER_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "DJANGO_DEBUG": "true",
        "DJANGO_LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def servers(server_env: dict[str, str]) -> Iterator[Callable[..., ServerProcess]]:
    """Start server processes on demand; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(server: str = "daphne", **env: str) -> ServerProcess:
        proc = ServerProcess(env={**server_env, **env}, server=server).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
