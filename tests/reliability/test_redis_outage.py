"""Redis restarted or hung under live traffic: sockets stay up, posts fail fast, nothing is lost.

Two Daphne processes share one Redis of the test's own. Redis is SIGKILLed and restarted
empty (every subscription and key gone), or frozen with SIGSTOP and thawed with SIGCONT.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from chat.models import Message
from tests.reliability.conftest import metrics_port, tokens
from tests.reliability.harness import Member, Redis, metric, missing, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]

ROOMS = ["final", "lobby"]


async def _stored_ids() -> dict[str, set[int]]:
    ids: dict[str, set[int]] = {room: set() for room in ROOMS}
    for room, pk in Message.objects.values_list("room__slug", "id"):
        ids.setdefault(room, set()).add(pk)
    return ids


async def _fault_cycle(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    redis_server: Redis,
    fault: Callable[[], Any],
    heal: Callable[[], Any],
    outage_s: float,
) -> dict[str, Any]:
    """Traffic on two processes; `fault`, posts during the outage, `heal`, check everything."""
    for room in ROOMS:
        make_room(room)
    one = chat_server(REDIS_URL=redis_server.url)
    two = chat_server(REDIS_URL=redis_server.url)
    urls = [one.url, two.url]
    members = [
        Member(f"m{i}", token, lambda: urls, ROOMS, first_url=i, fmt="msgpack" if i % 3 else "json")
        for i, token in enumerate(tokens(make_user, "fan", 6))
    ]
    for member in members:
        member.start()
    for member in members:
        await member.ready()
    posters = members[0], members[1]  # one on each process

    # Before: fan-out works across processes.
    for i in range(6):
        await posters[i % 2].post(ROOMS[i % 2])
    await until(
        lambda: (
            not missing(members, {r: set() for r in ROOMS})
            and all(sum(len(s) for s in m.seen.values()) >= 6 for m in members)
        ),
        10,
        "fan-out before the fault",
    )

    # The fault, with posts during it: each gets an answer quickly, never a hang.
    fault()
    faulted_at = time.monotonic()
    during: list[tuple[Member, str]] = []
    while time.monotonic() - faulted_at < outage_s:
        for poster in posters:
            during.append((poster, await poster.post(ROOMS[len(during) % 2])))
        await asyncio.sleep(0.25)
    await until(
        lambda: all(p.answer_seconds(c) is not None for p, c in during),
        5,
        "every post during the outage answered",
    )
    slowest_answer = max(p.answer_seconds(c) or 0.0 for p, c in during)
    kinds = {p.answered[c][2].get("code", "ack") for p, c in during}

    # Heal, then keep posting until posts are acked again.
    heal()
    healed_at = time.monotonic()
    after: list[tuple[Member, str]] = []

    def acked_after() -> bool:
        return any(c in p.acked for p, c in after)

    while not acked_after():
        if time.monotonic() - healed_at > 20:
            raise AssertionError("posts not acked 20 s after Redis came back")
        for poster in posters:
            after.append((poster, await poster.post(ROOMS[len(after) % 2])))
        await asyncio.sleep(0.2)
    posting_back_s = time.monotonic() - healed_at

    # Fan-out to every member on both processes, without any server restart.
    probe = await posters[0].post("final")
    await until(lambda: probe in posters[0].acked, 10, "probe acked")
    probe_id = posters[0].acked[probe]
    fanout_back_s = await until(
        lambda: all(probe_id in m.seen["final"] for m in members), 15, "fan-out after the fault"
    )
    # Every stored message, including those posted during the outage, reaches every member:
    # the ones that missed them get `resync` and re-join with `since`.
    stored = await _stored_ids()
    await until(
        lambda: not missing(members, stored),
        15,
        lambda: (
            f"recovery: missing {missing(members, stored)}, resyncs "
            f"{[m.resyncs for m in members]}, connects {[m.connects for m in members]}"
        ),
    )
    recovered_s = time.monotonic() - healed_at

    for p, c in during:
        answer = p.answered[c][2]
        assert answer["type"] == "ack" or (answer["code"] == "unavailable" and "id" in answer), (
            answer
        )
    result = {
        "posts_during": len(during),
        "slowest_answer_s": round(slowest_answer, 2),
        "answers": sorted(kinds),
        "posting_back_s": round(posting_back_s, 2),
        "fanout_after_ack_s": round(fanout_back_s, 2),
        "recovered_s": round(recovered_s, 2),
        "stored": sum(len(ids) for ids in stored.values()),
        "resyncs": [m.resyncs for m in members],
        "connects": [m.connects for m in members],
        "resync_metric": [await metric(metrics_port(s), "chat_resyncs_total") for s in (one, two)],
        "alive": [s.proc.poll() is None for s in (one, two)],
    }
    for member in members:
        await member.stop()
    return result


def _describe(what: str, r: dict[str, Any]) -> str:
    return (
        f"{what}: {r['posts_during']} posts during the outage, all answered "
        f"({'/'.join(r['answers'])}), the slowest in {r['slowest_answer_s']} s; posts acked "
        f"again {r['posting_back_s']} s after Redis came back, fan-out to all 6 members "
        f"{r['fanout_after_ack_s']} s later; all {r['stored']} stored messages seen by every "
        f"member {r['recovered_s']} s after Redis came back (resyncs per member "
        f"{r['resyncs']}); no socket dropped (connects {r['connects']})"
    )


async def test_redis_restart_mid_traffic_keeps_sockets_and_loses_nothing(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    redis_server: Redis,
) -> None:
    """Redis SIGKILLed and restarted empty: no socket drops, posts during the outage get
    `error unavailable` (stored, with id) within the Redis timeout, fan-out resumes by itself,
    and every member gets every stored message through `resync` and `since`."""
    result = await _fault_cycle(
        chat_server,
        make_user,
        make_room,
        redis_server,
        fault=redis_server.kill,
        heal=redis_server.start,
        outage_s=3.0,
    )
    print(_describe("redis restart", result))
    assert all(result["alive"])
    assert result["connects"] == [1] * 6, "every client kept its socket"
    assert result["slowest_answer_s"] < 2.5  # CHAT_REDIS_TIMEOUT 1 s, plus margin
    assert result["answers"] == ["unavailable"]
    assert all(n >= 1 for n in result["resync_metric"]), "both processes noticed the outage"
    assert result["recovered_s"] < 15


async def test_redis_frozen_with_sigstop_then_continued(
    chat_server: Callable[..., Any],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
    redis_server: Redis,
) -> None:
    """Redis SIGSTOPped (connections open, nothing answers): posts are answered within the
    Redis timeout instead of hanging; after SIGCONT everything recovers without restarts."""
    result = await _fault_cycle(
        chat_server,
        make_user,
        make_room,
        redis_server,
        fault=redis_server.pause,
        heal=redis_server.resume,
        outage_s=4.0,
    )
    print(_describe("redis sigstop", result))
    assert all(result["alive"])
    assert result["connects"] == [1] * 6, "every client kept its socket"
    # A hung Redis costs a post CHAT_REDIS_TIMEOUT twice (limits, publish) until the probe
    # marks Redis down (after 2 x CHAT_PROBE_INTERVAL + CHAT_REDIS_TIMEOUT = 2 s), and a post
    # may wait behind the previous one on its socket; after that posts fail at once.
    assert result["slowest_answer_s"] < 5
    assert set(result["answers"]) <= {"unavailable", "ack"}
    assert result["recovered_s"] < 15
