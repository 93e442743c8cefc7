"""Moderation acting on every process at once: two Daphne processes, one real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group
from django.test import Client as HttpClient

from tests.support import Client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes, pytest.mark.redis]


@pytest.fixture(autouse=True)
def _setup_orm_in_async_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def two(servers: Any, settings: Any) -> tuple[Any, Any]:
    """Two processes sharing this test's Redis prefix, so this process can publish to them."""
    env = {"CHAT_LAYER_PREFIX": settings.CHAT_LAYER_PREFIX, "CHAT_RATE_MESSAGES": "4"}
    return servers("daphne", **env), servers("daphne", **env)


@pytest.fixture
def people(make_user: Any, make_room: Any) -> dict[str, Any]:
    make_room("final")
    mod, mod_token = make_user("mod")
    mod.is_staff = True
    mod.save()
    mod.groups.add(Group.objects.get(name="Moderators"))
    return {
        "mod": (mod, mod_token),
        "alice": make_user("alice"),
        "bob": make_user("bob"),
    }


async def _on_both(two: tuple[Any, Any], token: str) -> list[Client]:
    clients = [
        await Client.connect(two[0].url, token=token),
        await Client.connect(two[1].url, token=token),
    ]
    for client in clients:
        await client.join("final")
    return clients


async def test_admin_delete_reaches_clients_on_both_processes_within_a_second(
    two: tuple[Any, Any], people: dict[str, Any]
) -> None:
    watchers = await _on_both(two, people["alice"][1])
    poster = await Client.connect(two[0].url, token=people["bob"][1])
    await poster.join("final")
    await poster.post("final", "delete me", client_id="d1")
    message_id = (await poster.expect("ack"))["id"]
    for watcher in watchers:
        await watcher.messages(1)

    def delete_in_admin() -> int:
        client = HttpClient()
        client.force_login(people["mod"][0])
        return client.post(
            "/admin/chat/message/",
            {"action": "delete_selected", "_selected_action": [message_id], "post": "yes"},
        ).status_code

    started = time.monotonic()
    assert await sync_to_async(delete_in_admin)() == 302
    for watcher in watchers:
        assert await watcher.expect("delete", timeout=1.0) == {
            "type": "delete",
            "room": "final",
            "id": message_id,
        }
    assert time.monotonic() - started < 1.5  # admin round trip included


async def test_chat_ban_closes_the_players_sockets_on_both_processes(
    two: tuple[Any, Any], people: dict[str, Any]
) -> None:
    """A room ban issued on one process takes the player out of the room on every process."""
    bob_sockets = await _on_both(two, people["bob"][1])
    mod = await Client.connect(two[0].url, token=people["mod"][1])
    await mod.join("final")
    await mod.post("final", "/ban bob flaming", client_id="b1")
    assert (await mod.expect("notice"))["detail"] == "banned bob from final"
    for sock in bob_sockets:
        error = await sock.expect("error", timeout=1.0)
        assert (error["code"], error["reason"]) == ("banned", "flaming")
        await sock.expect("left", timeout=1.0)
    again = await Client.connect(two[1].url, token=people["bob"][1])
    await again.send({"type": "join", "room": "final"})
    assert (await again.expect("error"))["code"] == "banned"


async def test_global_timeout_closes_sockets_everywhere_with_4003(
    two: tuple[Any, Any], people: dict[str, Any]
) -> None:
    from chat import services

    bob_sockets = await _on_both(two, people["bob"][1])
    await sync_to_async(services.sanction_apply)(
        actor_id=people["mod"][0].pk,
        target_id=people["bob"][0].pk,
        kind="timeout",
        room_id=None,
        duration_s=600,
        reason="cool down",
        via="admin",
    )
    for sock in bob_sockets:
        assert (await sock.expect("error", timeout=1.0))["code"] == "banned"
        with pytest.raises(Exception):  # noqa: B017 - websockets raises ConnectionClosed
            await sock.recv(timeout=2)
        assert sock.ws.close_code == 4003


async def test_rate_limit_holds_across_processes(
    two: tuple[Any, Any], people: dict[str, Any]
) -> None:
    """One player on two processes meets one limit (4 per window here)."""
    one, other = await _on_both(two, people["alice"][1])
    answers = []
    for i in range(6):
        sock = one if i % 2 == 0 else other
        await sock.post("final", f"spread {i}", client_id=f"s{i}")
        answers.append(await _answer(sock))
    assert [a["type"] for a in answers] == ["ack"] * 4 + ["error"] * 2
    assert all(a["code"] == "rate_limited" and a["retry_after_ms"] > 0 for a in answers[4:])


async def test_repeats_and_slow_mode_hold_across_processes(
    two: tuple[Any, Any], people: dict[str, Any]
) -> None:
    """The same text again, or a second post inside slow mode, is refused on the other process
    too; a moderator is exempt from both (one Redis script checks every limit of a post)."""
    from chat.models import Room

    alice, other = await _on_both(two, people["alice"][1])
    await alice.post("final", "gg wp", client_id="r1")
    assert (await _answer(alice))["type"] == "ack"
    await other.post("final", "GG WP", client_id="r2")
    refused = await _answer(other)
    assert refused["code"] == "repeated" and refused["retry_after_ms"] > 0

    await sync_to_async(Room.objects.filter(slug="final").update)(slow_mode_seconds=30)
    bob, bob_other = await _on_both(two, people["bob"][1])  # joins read the room's rules
    mod, mod_other = await _on_both(two, people["mod"][1])
    await bob.post("final", "first", client_id="b1")
    assert (await _answer(bob))["type"] == "ack"
    await bob_other.post("final", "second", client_id="b2")
    slowed = await _answer(bob_other)
    assert slowed["code"] == "slow_mode" and 25_000 < slowed["retry_after_ms"] <= 30_000
    for i, sock in enumerate((mod, mod_other, mod)):
        await sock.post("final", "same words", client_id=f"m{i}")
        assert (await _answer(sock))["type"] == "ack"


async def _answer(client: Client) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        for frame in await client.events(deadline - asyncio.get_running_loop().time()):
            if frame["type"] in ("ack", "error"):
                return frame
