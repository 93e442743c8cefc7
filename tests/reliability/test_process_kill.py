"""A server process killed with SIGKILL: its clients move to the other one and lose nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from chat.models import Message
from tests.reliability.conftest import FAST, tokens
from tests.reliability.harness import Member, missing, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]


async def test_sigkilled_process_clients_recover_every_message_and_presence_heals(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
) -> None:
    """SIGKILL one of two processes while a room is busy: its clients reconnect to the other
    process and recover every message with `since`; the room's online count, briefly
    inflated by the dead process's entries, is exact again within CHAT_PRESENCE_TTL."""
    make_room("final")
    one, two = chat_server(), chat_server()
    urls = [one.url, two.url]
    members = [
        Member(f"m{i}", token, lambda: urls, ["final"], first_url=i)
        for i, token in enumerate(tokens(make_user, "fan", 10))
    ]
    for member in members:
        member.start()
    for member in members:
        await member.ready()
    on_one = [m for i, m in enumerate(members) if i % 2 == 0]
    on_two = [m for i, m in enumerate(members) if i % 2 == 1]
    await until(lambda: all(m.online.get("final") == 10 for m in members), 10, "online 10")

    stop = asyncio.Event()

    async def post_steadily(poster: Member) -> None:
        while not stop.is_set():
            await poster.post("final")
            await asyncio.sleep(0.1)

    # Posters on both processes: the killed one's posts in flight are resent after reconnect.
    posting = [asyncio.create_task(post_steadily(m)) for m in (on_one[0], on_two[0])]
    await asyncio.sleep(2)
    assert two.proc is not None
    two.proc.kill()
    killed_at = time.monotonic()
    counts: list[tuple[float, int]] = []  # (seconds after the kill, online count shown)

    async def watch_count() -> None:
        while True:
            counts.append((time.monotonic() - killed_at, on_one[1].online.get("final", 0)))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_count())
    await asyncio.get_running_loop().run_in_executor(None, two.proc.wait, 10)
    reconnected_s = await until(
        lambda: all(m.connects == 2 and all(e.is_set() for e in m.joined.values()) for m in on_two),
        15,
        lambda: f"reconnects {[m.connects for m in on_two]}",
    )
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*posting)
    await until(
        lambda: all(not m.pending for m in members), 10, "every post answered after the kill"
    )

    stored = {"final": set(Message.objects.values_list("id", flat=True))}
    recovered_s = await until(
        lambda: not missing(members, stored), 15, lambda: f"missing {missing(members, stored)}"
    )
    acked = {m.acked[c] for m in (on_one[0], on_two[0]) for c in m.acked}  # what senders were told
    assert acked <= stored["final"]
    assert all(acked <= m.seen["final"] for m in members)
    # The dead process's presence entries expire: the count is exact again.
    ttl = float(FAST["CHAT_PRESENCE_TTL"])
    await until(
        lambda: all(m.online.get("final") == 10 for m in members),
        ttl + 5,
        lambda: f"online {[m.online.get('final') for m in members]}",
    )
    watcher.cancel()
    peak = max(count for _, count in counts)
    healed_at = next(t for t, count in reversed(counts) if count != 10)
    print(
        f"sigkill: {len(stored['final'])} messages, {len(acked)} acked; clients of the killed "
        f"process back in {reconnected_s:.2f} s, all recovered "
        f"{time.monotonic() - killed_at:.2f} s after the kill ({recovered_s:.2f} s after "
        f"posting stopped); online count peaked at {peak} (the dead process's entries) and "
        f"was exact again {healed_at:.2f} s after the kill (TTL {ttl:g} s)"
    )
    assert peak > 10, "the reconnected users were counted twice until the dead entries expired"
    assert healed_at < ttl + 2.5  # TTL, plus one presence interval and a noisy machine
    assert one.proc is not None and one.proc.poll() is None
    for member in members:
        await member.stop()
