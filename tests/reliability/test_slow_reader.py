"""Slow readers: a client that stops reading while its room is busy costs bounded memory,
is closed with 4008, and does not slow anyone else down. Under Daphne and under Uvicorn.

The room gets 100 messages a second of about 1.5 KB each (480 three-byte characters), so a
socket that stops reading falls 1 MiB (CHAT_OUTBOUND_LIMIT_BYTES, the default) behind in
about seven seconds. The test publishes them to the room's channel-layer group itself, as
the services do after storing a post: the fan-out is under test here, not how many posts a
second this shared machine can store (fewer than 100: posters' own frames would then queue
in the server, and their pongs with them). The slow clients are raw sockets with a 4 KiB
receive buffer, so their side absorbs next to nothing: the backlog piles up on the server's
side, in its kernel send buffer (outside RSS, at most net.ipv4.tcp_wmem's maximum) and in the
server process, where the hub counts every byte it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from chat import hub, protocol
from chat.models import Message
from tests.reliability.conftest import metrics_port, pid, tokens
from tests.reliability.harness import Member, RawSocket, metric, rss, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes, pytest.mark.redis]

RATE = 100  # messages per second into the room
BODY = "€" * 480  # 1,440 bytes of UTF-8
LIMIT = 1_048_576  # CHAT_OUTBOUND_LIMIT_BYTES, the default


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _server_has_connection(server_pid: int, client_port: int) -> bool:
    """Whether the server process still holds the TCP connection from this client port."""
    try:
        conns = psutil.Process(server_pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port == client_port for c in conns)


async def _slow_client(port: int, token: str) -> RawSocket:
    """A socket joined to the room; the caller then stops reading it.

    It joins with `since` the newest message, so `joined` is small: through a 4 KiB window
    the loopback's 64 KiB segments crawl, and a large history would take seconds to read."""
    newest = Message.objects.order_by("-id").values_list("id", flat=True).first() or 0
    raw = await RawSocket.connect(port, token=token, rcvbuf=4096)
    assert raw.status == 101
    assert (await raw.next_json())["type"] == "hello"
    await raw.send_json({"type": "join", "room": "final", "since": newest})
    while (await raw.next_json())["type"] != "joined":
        pass
    return raw


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
async def test_slow_readers_are_closed_4008_with_bounded_memory(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    settings: Any,
    kind: str,
) -> None:
    """Two clients stop reading (one silent, one still sending a small frame twice a second)
    while the room gets 100 msg/s: each is closed with 4008 once 1 MiB is unconfirmed, the
    server's RSS grows by a few MiB at most, and the others' latency barely moves."""
    room = make_room("final")
    # The default heartbeat (30 s, closing after 60 s without a pong): flow control, not the
    # heartbeat, must be what catches a reader that stops.
    server = chat_server(
        kind,
        CHAT_HEARTBEAT_INTERVAL="30",
        CHAT_HEARTBEAT_TIMEOUT="60",
        CHAT_LAYER_PREFIX=settings.CHAT_LAYER_PREFIX,  # this test process publishes to it
    )
    urls = [server.url]
    people = tokens(make_user, "p", 3 + 2)
    watchers = [
        Member(f"watch{i}", people[i], lambda: urls, ["final"], fmt=fmt)
        for i, fmt in enumerate(["json", "msgpack", "json"])
    ]
    for member in watchers:
        member.start()
    for member in watchers:
        await member.ready()

    server_pid = pid(server)
    samples: list[tuple[float, int]] = []
    published: list[float] = []
    stop = asyncio.Event()

    async def publish_at_rate() -> None:
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
            n += 1
            now_ms = int(time.time() * 1000)
            frame = protocol.message(room="final", id=n, user="caster", body=BODY, ts=now_ms)
            await hub.publish(room.id, frame)
            published.append(time.monotonic())

    async def sample_rss() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), rss(server_pid)))
            await asyncio.sleep(0.1)

    load = asyncio.create_task(publish_at_rate())
    sampler = asyncio.create_task(sample_rss())
    await asyncio.sleep(3)  # baseline: the busy room with every reader keeping up
    baseline_end = time.monotonic()
    baseline_rss = max(r for _, r in samples)

    slow = [
        await _slow_client(server.port, people[-2]),
        await _slow_client(server.port, people[-1]),
    ]
    stopped_at = time.monotonic()

    async def chatter(raw: RawSocket) -> None:
        while not stop.is_set():
            await raw.send_json({"type": "ping"})
            await asyncio.sleep(0.5)

    chatting = asyncio.create_task(chatter(slow[1]))
    ports = [s.sock.getsockname()[1] for s in slow]
    key = 'chat_events_dropped_total{reason="slow_consumer"}'

    async def both_dropped() -> bool:
        return await metric(metrics_port(server), key) >= 2

    decided_s = await until(both_dropped, 30, "the hub closed both with 4008", interval=0.2)
    released_s = decided_s + await until(
        lambda: not any(_server_has_connection(server_pid, p) for p in ports),
        40,
        "the server released both TCP connections",
        interval=0.1,
    )
    dropped = await metric(metrics_port(server), key)
    await asyncio.sleep(2)  # the room keeps going after the drop
    stop.set()
    chatting.cancel()
    await asyncio.gather(load, sampler, return_exceptions=True)
    slow_end = time.monotonic()
    rate = sum(1 for at in published if at >= stopped_at) / (slow_end - stopped_at)

    # What a slow client finds if it reads again: everything up to the close frame, or a reset.
    codes = []
    for raw in slow:
        with contextlib.suppress(TimeoutError, OSError):
            await raw.read_until_closed(10)
        codes.append(raw.close_code)
        raw.close()

    def latencies(since: float, until_: float) -> list[float]:
        base = time.time() - time.monotonic()
        return [
            lag for m in watchers for at, lag in m.latencies if since + base <= at <= until_ + base
        ]

    before = latencies(baseline_end - 2.5, baseline_end)
    during = latencies(stopped_at, slow_end)
    peak_growth = max(r for _, r in samples) - baseline_rss
    p95_before, p95_during = _percentile(before, 95), _percentile(during, 95)
    print(
        f"slow reader ({kind}): {rate:.0f} msg/s; closed 4008 {decided_s:.1f} s after it "
        f"stopped reading, TCP released after {released_s:.1f} s; close codes seen when "
        f"reading again {codes}; RSS baseline {baseline_rss / 2**20:.1f} MiB, peak growth "
        f"{peak_growth / 2**20:.1f} MiB; others' latency p50/p95 "
        f"{statistics.median(before) * 1000:.0f}/{p95_before * 1000:.0f} ms before, "
        f"{statistics.median(during) * 1000:.0f}/{p95_during * 1000:.0f} ms during"
    )
    assert dropped == 2, "both slow sockets were closed for being slow (4008)"
    # 1 MiB at ~150 KB/s is ~7 s; generous for a shared machine. Uvicorn keeps the TCP
    # connection until its own ping timeout (20 s) since the peer never reads the close frame.
    assert decided_s < 20
    assert released_s < 45
    # In the process: at most 1 MiB of backlog per slow socket (less: the kernel holds most
    # of it), plus allocator noise of a busy process.
    assert peak_growth < 2 * LIMIT + 6 * 2**20
    assert p95_during < max(3 * p95_before, p95_before + 0.25)
    assert all(c in (4008, None) for c in codes)
    for member in watchers:
        assert member.connects == 1, f"{member.name} lost its socket: {member.close_codes}"
        assert len(member.seen["final"]) >= len(published) - 5, "it got every message"
        await member.stop()
