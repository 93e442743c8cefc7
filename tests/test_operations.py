"""Operating a process: health, readiness, per-process metrics, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import websockets

from tests.support import Client, RedisServer, free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]


@pytest.fixture(autouse=True)
def _setup_orm_in_async_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def _get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _fetch(url: str, host: str | None = None) -> tuple[int, str]:
    return await asyncio.get_running_loop().run_in_executor(None, _get, url, host)


async def test_readyz_names_redis_when_it_is_gone(servers: Any) -> None:
    """Ready with every part up; 503 naming the broken part once Redis stops."""
    redis = RedisServer().start()
    try:
        server = servers("daphne", REDIS_URL=redis.url, CHAT_REDIS_TIMEOUT="0.5")
        status, body = await _fetch(f"{server.http}/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        status, body = await _fetch(f"{server.http}/readyz")
        assert status == 200, body
        assert set(json.loads(body)["ms"]) == {"database", "redis", "channel_layer"}
        redis.stop()
        status, body = await _fetch(f"{server.http}/readyz")
        failures = json.loads(body)["failures"]
        assert status == 503 and "redis" in failures and "channel_layer" in failures
        status, _ = await _fetch(f"{server.http}/healthz")
        assert status == 200  # alive, just not ready
        # Probes by address: answered whatever Host they carry (not in ALLOWED_HOSTS).
        assert (await _fetch(f"{server.http}/healthz", host="10.1.2.3:8000"))[0] == 200
        assert (await _fetch(f"{server.http}/rooms/", host="10.1.2.3:8000"))[0] == 400
    finally:
        redis.cleanup()


async def test_each_process_serves_its_own_metrics(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    make_room("final")
    (_, t1), (_, t2) = make_user("a"), make_user("b")
    ports = free_port(), free_port()
    one = servers("daphne", CHAT_METRICS_PORT=str(ports[0]))
    two = servers("daphne", CHAT_METRICS_PORT=str(ports[1]))
    a = await Client.connect(one.url, token=t1)
    b = await Client.connect(two.url, token=t2)
    await a.join("final")
    await b.join("final")
    await a.post("final", "counted", client_id="m1")
    await b.messages(1)
    await a.expect("ack")  # counted once the post is answered, which can be after delivery
    _, first = await _fetch(f"http://127.0.0.1:{ports[0]}/metrics")
    _, second = await _fetch(f"http://127.0.0.1:{ports[1]}/metrics")
    assert "chat_sockets_open 1.0" in first and "chat_sockets_open 1.0" in second
    assert "chat_messages_posted_total 1.0" in first
    assert "chat_messages_posted_total 0.0" in second
    assert 'chat_frames_out_total{type="message"}' in second
    assert "chat_delivery_latency_seconds_bucket" in second
    per_socket = next(
        float(line.split()[1])
        for line in second.splitlines()
        if line.startswith("chat_memory_per_socket_bytes ")
    )
    assert 1_000_000 < per_socket < 1_000_000_000  # one socket: the whole process RSS
    await a.close()
    await b.close()


async def test_sigterm_drains_sockets_with_a_reconnect_hint_and_exits(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    """SIGTERM: every socket gets `reconnect {retry_ms}` and close 4012, spread over the
    drain window, and the process exits within a bounded time."""
    make_room("final")
    tokens = [make_user(f"p{i}")[1] for i in range(6)]
    server = servers(
        "daphne", REDIS_URL="", CHAT_DRAIN_SPREAD="1.0", CHAT_DRAIN_RETRY_MAX_MS="3000"
    )
    clients = [await Client.connect(server.url, token=t) for t in tokens]
    for client in clients:
        await client.join("final")
    assert server.proc is not None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    async def closed(client: Client) -> float:
        hint = await client.expect("reconnect", timeout=5)
        assert 0 <= hint["retry_ms"] <= 3000
        with pytest.raises(Exception):  # noqa: B017 - the close ends the stream
            await client.recv(timeout=5)
        assert client.ws.close_code == 4012
        return time.monotonic() - started

    await asyncio.sleep(0.1)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(server.url, token=tokens[0])
    assert refused.value.response.status_code == 403  # a balancer can try the next process
    closed_at = await asyncio.gather(*(closed(client) for client in clients))
    assert max(closed_at) - min(closed_at) > 0.3, "closes are spread, not all at once"
    await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 15)
    assert time.monotonic() - started < 10


async def test_uvicorn_lets_go_of_each_handshake_and_keeps_working(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    """The handshake release (chat.consumers._release_handshake) reaches into Uvicorn's
    websockets-sansio protocol; with the Uvicorn this project pins it must still apply to
    every socket, and the sockets must work on (chat, pings, a clean close) without it."""
    make_room("final")
    (_, t1), (_, t2) = make_user("a"), make_user("b")
    port = free_port()
    server = servers("uvicorn", CHAT_METRICS_PORT=str(port))
    a = await Client.connect(server.url, token=t1)
    b = await Client.connect(server.url, token=t2, fmt="msgpack")
    await a.join("final")
    await b.join("final")
    await a.post("final", "still here", client_id="m1")
    assert [m["body"] for m in await b.messages(1)] == ["still here"]
    _, text = await _fetch(f"http://127.0.0.1:{port}/metrics")
    assert "chat_handshakes_released_total 2.0" in text
    await a.close()
    await b.close()
