"""Dead peers: sockets whose client vanished, or that chatter but never answer `ping`, are
closed by the heartbeat within CHAT_HEARTBEAT_TIMEOUT plus one CHAT_HEARTBEAT_INTERVAL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from tests.reliability.conftest import metrics_port, pid, tokens
from tests.reliability.harness import Member, RawSocket, metric, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]

INTERVAL, TIMEOUT = 0.5, 2.0


async def _joined_raw(port: int, token: str) -> RawSocket:
    raw = await RawSocket.connect(port, token=token)
    assert raw.status == 101
    assert (await raw.next_json())["type"] == "hello"
    await raw.send_json({"type": "join", "room": "final"})
    while (await raw.next_json())["type"] != "joined":
        pass
    return raw


def _held(server_pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(server_pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == "ESTABLISHED" for c in conns)


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
async def test_heartbeat_closes_vanished_and_deaf_clients(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    kind: str,
) -> None:
    """A client that vanished without a close frame (never reads, never writes again) and one
    that keeps sending small frames but never answers `ping` are both closed with 4010 within
    the heartbeat timeout plus one interval; a client that answers stays; presence follows."""
    make_room("final")
    server = chat_server(
        kind, CHAT_HEARTBEAT_INTERVAL=str(INTERVAL), CHAT_HEARTBEAT_TIMEOUT=str(TIMEOUT)
    )
    vanished_token, deaf_token, alive_token = tokens(make_user, "peer", 3)
    alive = Member("alive", alive_token, lambda: [server.url], ["final"]).start()
    await alive.ready()
    started = time.monotonic()
    vanished = await _joined_raw(server.port, vanished_token)
    deaf = await _joined_raw(server.port, deaf_token)
    await until(lambda: alive.online.get("final") == 3, 5, "online 3")

    async def chatter() -> None:
        # Client pings and typing: traffic that must not count as an answer to the heartbeat.
        with_typing = False
        while True:
            frame = {"type": "typing", "room": "final"} if with_typing else {"type": "ping"}
            await deaf.send_json(frame)
            with_typing = not with_typing
            await asyncio.sleep(0.2)

    chatting = asyncio.create_task(chatter())
    frames = await deaf.read_until_closed(TIMEOUT + INTERVAL + 5)
    deaf_closed_s = time.monotonic() - started
    chatting.cancel()
    assert deaf.close_code == 4010
    assert any(f["type"] == "ping" for f in frames), "it was pinged and did not answer"
    # Both dropped sockets leave the room's online count at once, before their TCP closes.
    await until(lambda: alive.online.get("final") == 1, 3, "online back to 1")
    presence_s = time.monotonic() - started

    server_pid = pid(server)
    vanished_port = vanished.sock.getsockname()[1]
    released_s = (
        await until(
            lambda: not _held(server_pid, vanished_port), 15, "the vanished socket released"
        )
        + time.monotonic()
        - started
    )
    dropped = await metric(
        metrics_port(server), 'chat_events_dropped_total{reason="heartbeat_timeout"}'
    )
    print(
        f"dead peer ({kind}): deaf chatterer closed 4010 after {deaf_closed_s:.2f} s, vanished "
        f"client's connection released after {released_s:.2f} s (heartbeat {INTERVAL} s / "
        f"timeout {TIMEOUT} s); online count 1 again after {presence_s:.2f} s"
    )
    assert dropped == 2
    assert deaf_closed_s < TIMEOUT + INTERVAL + 1.5  # the bound, plus a noisy machine
    # The vanished client never answers the close frame: Daphne gives up on the closing
    # handshake after a few seconds, Uvicorn after its own ping timeout (20 s by default).
    assert released_s < TIMEOUT + INTERVAL + (8 if kind == "daphne" else 25)
    assert alive.connects == 1 and alive.close_codes == []
    vanished.close()
    deaf.close()
    await alive.stop()
