"""Redis Sentinel failover: the primary dies, a replica is promoted, the chat follows it.

A primary, a replica and three sentinels (Debian's redis-server and redis-sentinel) on
loopback; two Daphne processes configured only with REDIS_SENTINELS and REDIS_SENTINEL_MASTER
(no REDIS_URL), so the channel layer, presence and the rate limits all find the primary
through the sentinels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from chat.models import Message
from tests.reliability.conftest import tokens
from tests.reliability.harness import Member, SentinelGroup, missing, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]

RATE = 6  # posts per user per window, for the rate-limit check


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    try:
        yield group.start()
    finally:
        group.cleanup()


async def _answer(member: Member, client_id: str) -> dict[str, Any]:
    await until(lambda: client_id in member.answered, 10, f"answer to {client_id}")
    return member.answered[client_id][2]


async def test_failover_to_the_replica_keeps_fanout_presence_and_rate_limits(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    sentinels: SentinelGroup,
) -> None:
    """SIGKILL the primary: within seconds of the promotion, posts are acked again, fan-out
    spans both processes, online counts and rate limits live on the promoted replica, and
    clients recover the messages posted during the failover with `since`."""
    make_room("final")
    env = {
        "REDIS_URL": "",
        "REDIS_SENTINELS": sentinels.addresses,
        "REDIS_SENTINEL_MASTER": SentinelGroup.MASTER,
        "CHAT_RATE_MESSAGES": str(RATE),
    }
    one, two = chat_server(**env), chat_server(**env)
    urls = [one.url, two.url]
    members = [
        Member(f"m{i}", token, lambda: urls, ["final"], first_url=i)
        for i, token in enumerate(tokens(make_user, "fan", 6))
    ]
    spammer_token = make_user("spammer")[1]
    spam = [Member(f"s{i}", spammer_token, lambda: urls, ["final"], first_url=i) for i in range(2)]
    for member in [*members, *spam]:
        member.start()
    for member in [*members, *spam]:
        await member.ready()
    everyone = [*members, *spam]
    # 6 fans, and the spammer once per process (presence counts a user once per process).
    await until(
        lambda: all(m.online.get("final") == 8 for m in everyone),
        10,
        lambda: f"online {[m.online.get('final') for m in everyone]}",
    )
    # Half the spammer's allowance, spent before the failover on the old primary.
    for i in range(RATE // 2):
        assert (await _answer(spam[i % 2], await spam[i % 2].post("final")))["type"] == "ack"

    old_primary = sentinels.primary.port
    sentinels.primary.kill()
    killed_at = time.monotonic()
    promoted_s = await until(
        lambda: sentinels.master_port() == sentinels.replica.port, 20, "replica promoted"
    )

    # Posts from both processes until both ack again.
    posters = members[0], members[1]
    posted: list[tuple[Member, str]] = []
    while not all(any(c in p.acked for q, c in posted if q is p) for p in posters):
        if time.monotonic() - killed_at > 30:
            raise AssertionError("no post acked 30 s after the primary died")
        for poster in posters:
            posted.append((poster, await poster.post("final")))
        await asyncio.sleep(0.25)
    acked_s = time.monotonic() - killed_at
    await until(lambda: all(p.answer_seconds(c) is not None for p, c in posted), 10, "all answered")
    slowest = max(p.answer_seconds(c) or 0.0 for p, c in posted)

    # Fan-out across both processes through the new primary.
    probe = await members[1].post("final")
    await until(
        lambda: probe in members[1].acked,
        10,
        lambda: (
            f"probe acked: {members[1].answered.get(probe)}, "
            f"{[(p.name, p.answered[c][2].get('code')) for p, c in posted]}"
        ),
    )
    fanout_s = await until(
        lambda: all(members[1].acked[probe] in m.seen["final"] for m in everyone),
        10,
        "fan-out after failover",
    )
    # Every stored message, those posted during the failover included, reaches everyone.
    stored = {"final": set(Message.objects.values_list("id", flat=True))}
    await until(lambda: not missing(everyone, stored), 15, lambda: f"{missing(everyone, stored)}")
    recovered_s = time.monotonic() - killed_at

    # Presence lives on the promoted replica: a newcomer on either process is counted by all.
    late = Member("late", make_user("late")[1], lambda: urls, ["final"], first_url=1).start()
    await late.ready()
    everyone.append(late)
    await until(
        lambda: all(m.online.get("final") == 9 for m in everyone),
        10,
        lambda: f"online {[m.online.get('final') for m in everyone]}",
    )
    promoted = redis.Redis(port=sentinels.replica.port, socket_timeout=2)
    presence_keys = [k for k in promoted.keys("*presence*")]
    assert presence_keys, "presence entries are written to the promoted replica"

    # The rate limit continues from the replicated state: the rest of the allowance, then no.
    answers = []
    for i in range(RATE // 2 + 1):
        sock = spam[i % 2]
        answers.append(await _answer(sock, await sock.post("final")))
    assert [a["type"] for a in answers] == ["ack"] * (RATE // 2) + ["error"]
    assert answers[-1]["code"] == "rate_limited"
    promoted.close()

    print(
        f"sentinel failover: primary {old_primary} killed; replica promoted after "
        f"{promoted_s:.2f} s; posts acked on both processes {acked_s:.2f} s; slowest "
        f"answer during failover {slowest:.2f} s; everything recovered "
        f"{recovered_s:.2f} s after the kill (probe fan-out {fanout_s:.2f} s)"
    )
    assert one.proc is not None and one.proc.poll() is None
    assert two.proc is not None and two.proc.poll() is None
    assert all(m.connects == 1 for m in members), "no client lost its socket"
    assert slowest < 5
    for member in everyone:
        await member.stop()
