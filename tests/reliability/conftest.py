"""Fixtures for the reliability suite: test-sized timeouts, servers with metrics ports, Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.reliability.harness import Redis
from tests.support import ServerProcess, free_port

# Every timeout the product has, shrunk so faults show and heal in seconds. The values are
# the ones docs/reliability.md quotes when it states each bound.
FAST = {
    "CHAT_REDIS_TIMEOUT": "1.0",
    "CHAT_PROBE_INTERVAL": "0.5",
    "CHAT_RESYNC_SPREAD": "0.5",
    "CHAT_PRESENCE_INTERVAL": "0.3",
    "CHAT_PRESENCE_TTL": "3",
    "CHAT_HEARTBEAT_INTERVAL": "1",
    "CHAT_HEARTBEAT_TIMEOUT": "4",
    "CHAT_BATCH_WINDOW_MS": "20",
    "CHAT_DRAIN_SPREAD": "0.3",  # servers stop quickly at the end of each test
    # The abuse limits are not under test here: traffic comes from few users, fast.
    "CHAT_RATE_MESSAGES": "1000000",
    "CHAT_REPEAT_WINDOW_SECONDS": "0",
    "CHAT_SOCKET_FRAMES_PER_10S": "100000",
}


@pytest.fixture(autouse=True)
def _setup_orm_in_async_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests create rows with the ORM from async code; only the servers serve them."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def redis_server() -> Iterator[Redis]:
    """A Redis of this test's own, which it may kill, restart, stop and continue."""
    server = Redis()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def chat_server(servers: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """Start a server process with the FAST settings and its own metrics port."""

    def start(kind: str = "daphne", **env: str) -> ServerProcess:
        return servers(kind, **{**FAST, "CHAT_METRICS_PORT": str(free_port()), **env})

    return start


def metrics_port(server: ServerProcess) -> int:
    return int(server.env["CHAT_METRICS_PORT"])


def pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def tokens(make_user: Callable[..., tuple[Any, str]], prefix: str, count: int) -> list[str]:
    return [make_user(f"{prefix}{i}")[1] for i in range(count)]
