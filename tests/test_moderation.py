"""Moderation in chat and in admin, and the abuse limits, through the real application."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Group
from django.test import Client as HttpClient
from django.utils import timezone

from chat import services
from chat.models import Message, ModerationLog, Sanction
from chat.services import text_normalize
from tests.support import Sock

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cast(make_user: Any, make_room: Any) -> dict[str, Any]:
    """A room with a moderator (mod), two players (alice, bob) and their tokens."""
    make_room("arena")
    make_room("lobby")
    mod, mod_token = make_user("mod")
    mod.groups.add(Group.objects.get(name="Moderators"))
    alice, alice_token = make_user("alice")
    bob, bob_token = make_user("bob")
    return {
        "mod": (mod, mod_token),
        "alice": (alice, alice_token),
        "bob": (bob, bob_token),
    }


async def _joined(token: str, *rooms: str) -> Sock:
    sock = await Sock.open(token=token)
    for room in rooms:
        await sock.join(room)
    return sock


async def _post(sock: Sock, body: str, room: str = "arena") -> dict[str, Any]:
    await sock.send({"type": "message", "room": room, "body": body, "client_id": body[:60]})
    found = await sock.gather_any("ack", "error", "notice")
    return found


def _log() -> list[tuple[str, str, str | None]]:
    return list(
        ModerationLog.objects.order_by("id").values_list("action", "via", "target__username")
    )


async def test_hello_tells_moderators_apart(cast: dict[str, Any]) -> None:
    mod = await Sock.open(token=cast["mod"][1], expect_hello=False)
    assert (await mod.recv())["moderator"] is True
    alice = await Sock.open(token=cast["alice"][1], expect_hello=False)
    assert (await alice.recv())["moderator"] is False


async def test_delete_command_removes_the_message_live_and_from_history(
    cast: dict[str, Any],
) -> None:
    """`/delete <id>`: every member gets `delete`; history and `since` no longer have it."""
    mod, alice = await _joined(cast["mod"][1], "arena"), await _joined(cast["alice"][1], "arena")
    ack = await _post(alice, "rude words")
    await alice.expect("message")
    notice = await _post(mod, f"/delete {ack['id']}")
    assert notice["type"] == "notice" and "deleted" in notice["detail"]
    assert await alice.expect("delete") == {"type": "delete", "room": "arena", "id": ack["id"]}
    late = await _joined(cast["bob"][1])
    assert (await late.join("arena"))["history"] == []
    assert (await late.join("arena", since=ack["id"] - 1))["history"] == []
    # A client that had seen it and was away meanwhile is told to drop it.
    assert (await late.join("arena", since=ack["id"]))["deleted"] == [ack["id"]]
    assert await database_sync_to_async(_log)() == [("delete", "chat", "alice")]


async def test_commands_from_non_moderators_are_forbidden_and_never_posted(
    cast: dict[str, Any],
) -> None:
    alice, bob = await _joined(cast["alice"][1], "arena"), await _joined(cast["bob"][1], "arena")
    for body in ("/ban bob", "/delete 1", "/clear", "/slow 30", "/timeout bob nonsense"):
        answer = await _post(alice, body)
        assert (answer["type"], answer["code"]) == ("error", "forbidden"), body
    assert await bob.nothing()
    assert await database_sync_to_async(Message.objects.count)() == 0
    assert await database_sync_to_async(_log)() == []


async def test_unknown_slash_words_are_ordinary_chat(cast: dict[str, Any]) -> None:
    alice = await _joined(cast["alice"][1], "arena")
    assert (await _post(alice, "/shrug gg"))["type"] == "ack"


async def test_malformed_command_gets_its_usage(cast: dict[str, Any]) -> None:
    mod = await _joined(cast["mod"][1], "arena")
    answer = await _post(mod, "/timeout bob soon")
    assert answer["code"] == "bad_command" and "usage" in answer["detail"]


async def test_room_timeout_takes_the_user_out_of_that_room_only(cast: dict[str, Any]) -> None:
    """`/timeout`: the player leaves the room with `error banned`, keeps other rooms, and
    cannot rejoin or post until it ends."""
    mod = await _joined(cast["mod"][1], "arena")
    bob = await _joined(cast["bob"][1], "arena", "lobby")
    notice = await _post(mod, "/timeout bob 600 spamming")
    assert notice["type"] == "notice"
    error = await bob.expect("error")
    assert error["code"] == "banned" and error["kind"] == "timeout" and error["ref"] == "arena"
    assert error["expires_ms"] > timezone.now().timestamp() * 1000 + 590_000
    assert await bob.expect("left") == {"type": "left", "room": "arena"}
    answer = await _post(bob, "let me back")
    assert answer["code"] == "not_joined"
    await bob.send({"type": "join", "room": "arena"})
    rejoin = await bob.expect("error")
    assert rejoin["code"] == "banned" and rejoin["expires_ms"] == error["expires_ms"]
    assert (await _post(bob, "still here", room="lobby"))["type"] == "ack"
    assert await database_sync_to_async(_log)() == [("timeout", "chat", "bob")]


async def test_unban_lets_the_player_back(cast: dict[str, Any]) -> None:
    mod = await _joined(cast["mod"][1], "arena")
    bob = await _joined(cast["bob"][1], "arena")
    await _post(mod, "/ban bob")
    await bob.expect("left")
    assert (await _post(mod, "/unban bob"))["type"] == "notice"
    assert (await bob.join("arena"))["room"] == "arena"
    assert [a for a, _, _ in await database_sync_to_async(_log)()] == ["ban", "unban"]


async def test_global_ban_closes_every_socket_with_4003_and_refuses_reconnects(
    cast: dict[str, Any],
) -> None:
    bob_one = await _joined(cast["bob"][1], "arena")
    bob_two = await _joined(cast["bob"][1], "lobby")
    mod_id, bob_id = cast["mod"][0].pk, cast["bob"][0].pk
    await database_sync_to_async(services.sanction_apply)(
        actor_id=mod_id,
        target_id=bob_id,
        kind="ban",
        room_id=None,
        duration_s=None,
        reason="cheating",
        via="admin",
    )
    for sock in (bob_one, bob_two):
        error = await sock.expect("error")
        assert (error["code"], error["reason"], error["expires_ms"]) == ("banned", "cheating", None)
        assert await sock.recv_raw() == {"type": "websocket.close", "code": 4003}
    again = await Sock.open(token=cast["bob"][1], expect_hello=False)
    assert (await again.recv())["code"] == "banned"
    assert await again.recv_raw() == {"type": "websocket.close", "code": 4003}


async def test_moderators_cannot_sanction_moderators(cast: dict[str, Any], make_user: Any) -> None:
    other, _ = await database_sync_to_async(make_user)("mod2")
    await database_sync_to_async(other.groups.add)(
        await database_sync_to_async(Group.objects.get)(name="Moderators")
    )
    mod = await _joined(cast["mod"][1], "arena")
    assert (await _post(mod, "/ban mod2"))["code"] == "forbidden"


async def test_slow_mode_is_announced_enforced_and_skips_moderators(
    cast: dict[str, Any],
) -> None:
    mod = await _joined(cast["mod"][1], "arena")
    alice = await _joined(cast["alice"][1], "arena")
    assert (await _post(mod, "/slow 30"))["detail"] == "slow mode 30 s"
    assert await alice.expect("room") == {
        "type": "room",
        "room": "arena",
        "slow_mode": 30,
        "read_only": False,
    }
    assert (await _post(alice, "first"))["type"] == "ack"
    refused = await _post(alice, "second")
    assert refused["code"] == "slow_mode" and 28_000 < refused["retry_after_ms"] <= 30_000
    assert (await _post(mod, "mods are exempt"))["type"] == "ack"
    assert (await _post(mod, "still exempt"))["type"] == "ack"
    rejoined = await _joined(cast["bob"][1], "arena")
    assert rejoined is not None


async def test_read_only_lets_only_moderators_post(cast: dict[str, Any]) -> None:
    mod = await _joined(cast["mod"][1], "arena")
    alice = await _joined(cast["alice"][1], "arena")
    await _post(mod, "/readonly on")
    assert (await _post(alice, "hello?"))["code"] == "read_only"
    assert (await _post(mod, "announcement"))["type"] == "ack"
    await _post(mod, "/readonly off")
    assert (await _post(alice, "hello!"))["type"] == "ack"


async def test_clear_empties_the_room_for_everyone(cast: dict[str, Any]) -> None:
    mod = await _joined(cast["mod"][1], "arena")
    alice = await _joined(cast["alice"][1], "arena")
    for i in range(3):
        await _post(alice, f"m{i}")
    assert (await _post(mod, "/clear"))["detail"] == "cleared 3 message(s)"
    assert await alice.expect("clear") == {"type": "clear", "room": "arena"}
    assert (await alice.join("arena"))["history"] == []


async def test_rate_limit_refuses_with_retry_after(cast: dict[str, Any], settings: Any) -> None:
    settings.CHAT_RATE_MESSAGES = 3
    settings.CHAT_RATE_MESSAGES_MODERATOR = 5
    alice = await _joined(cast["alice"][1], "arena")
    for i in range(3):
        assert (await _post(alice, f"fast {i}"))["type"] == "ack"
    refused = await _post(alice, "one too many")
    assert refused["code"] == "rate_limited" and 0 < refused["retry_after_ms"] <= 30_000
    assert refused["ref"] == "one too many"
    mod = await _joined(cast["mod"][1], "arena")
    answers = [(await _post(mod, f"mod {i}"))["type"] for i in range(6)]
    assert answers == ["ack"] * 5 + ["error"]


async def test_repeated_text_and_mention_floods_are_refused(cast: dict[str, Any]) -> None:
    alice = await _joined(cast["alice"][1], "arena")
    assert (await _post(alice, "gg wp"))["type"] == "ack"
    alice_again = await _post(alice, "GG WP ")
    assert alice_again["code"] == "repeated" and alice_again["retry_after_ms"] > 0
    flood = " ".join(f"@p{i}" for i in range(6))
    refused = await _post(alice, flood)
    assert refused["code"] == "too_many_mentions" and refused["limit"] == 5


def test_text_normalisation_strips_bidi_and_caps_combining_marks() -> None:
    assert text_normalize("a\u202eb\u2066c") == "abc"
    zalgo = "q" + "\u0301" * 30 + "a"  # no precomposed q with acute: all 30 stay marks
    assert text_normalize(zalgo) == "q\u0301\u0301a"
    assert text_normalize("e\u0301") == "\u00e9"  # NFC composes; nothing capped


# --- admin -----------------------------------------------------------------------------------


def _admin_client(user: Any) -> HttpClient:
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    client = HttpClient()
    client.force_login(user)
    return client


async def test_admin_bulk_delete_is_a_soft_delete_seen_live(cast: dict[str, Any]) -> None:
    """The changelist's delete action soft-deletes, logs, and tells open chats."""
    alice = await _joined(cast["alice"][1], "arena")
    ids = [(await _post(alice, f"spam {i}"))["id"] for i in range(3)]

    def delete_in_admin() -> int:
        client = _admin_client(cast["mod"][0])
        response = client.post(
            "/admin/chat/message/",
            {"action": "delete_selected", "_selected_action": ids[:2], "post": "yes"},
        )
        return response.status_code

    assert await database_sync_to_async(delete_in_admin)() == 302
    deleted = [(await alice.expect("delete"))["id"] for _ in range(2)]
    assert sorted(deleted) == ids[:2]
    remaining = await database_sync_to_async(
        lambda: list(Message.objects.filter(deleted_at__isnull=True).values_list("id", flat=True))
    )()
    assert remaining == [ids[2]]
    assert await database_sync_to_async(Message.objects.count)() == 3  # nothing hard-deleted
    assert [a for a, v, _ in await database_sync_to_async(_log)() if v == "admin"] == ["delete"] * 2


async def test_admin_timeout_action_creates_a_room_timeout(cast: dict[str, Any]) -> None:
    bob = await _joined(cast["bob"][1], "arena")
    message_id = (await _post(bob, "bait"))["id"]

    def act() -> None:
        client = _admin_client(cast["mod"][0])
        client.post(
            "/admin/chat/message/",
            {"action": "timeout_600", "_selected_action": [message_id]},
        )

    await database_sync_to_async(act)()
    assert (await bob.expect("error"))["code"] == "banned"
    sanction = await database_sync_to_async(
        lambda: Sanction.objects.values_list("kind", "room__slug").get()
    )()
    assert sanction == ("timeout", "arena")


def test_staff_without_the_permission_cannot_moderate(cast: dict[str, Any]) -> None:
    """Staff outside the Moderators group see no moderation actions and cannot delete."""
    alice, _ = cast["alice"]
    alice.user_permissions.add(
        *__import__(
            "django.contrib.auth.models", fromlist=["Permission"]
        ).Permission.objects.filter(codename__in=["view_message", "view_room"])
    )
    client = _admin_client(alice)
    page = client.get("/admin/chat/message/")
    assert page.status_code == 200
    assert b"timeout_600" not in page.content and b"delete_selected" not in page.content
    assert client.post("/admin/chat/message/", {"action": "timeout_600"}).status_code in (
        200,
        302,
        403,
    )
    assert not Sanction.objects.exists()
    with pytest.raises(services.ChatError):
        services.room_clear(actor_id=alice.pk, room_id=1, via="admin")


def test_moderation_log_is_read_only_in_admin(cast: dict[str, Any]) -> None:
    mod, _ = cast["mod"]
    client = _admin_client(mod)
    assert client.get("/admin/chat/moderationlog/").status_code == 200
    assert client.get("/admin/chat/moderationlog/add/").status_code == 403
    entry = ModerationLog.objects.create(created=timezone.now(), action="clear", via="chat")
    with pytest.raises(ValueError):
        entry.save()


async def test_delete_command_only_reaches_messages_of_its_room(cast: dict[str, Any]) -> None:
    """`/delete` typed in one room cannot remove a message of another room."""
    alice = await _joined(cast["alice"][1], "lobby")
    message_id = (await _post(alice, "elsewhere", room="lobby"))["id"]
    mod = await _joined(cast["mod"][1], "arena")
    answer = await _post(mod, f"/delete {message_id}")
    assert answer["code"] == "bad_command"
    assert await database_sync_to_async(Message.objects.filter(deleted_at=None).count)() == 1


def test_moderators_can_pick_players_on_the_sanction_form(cast: dict[str, Any]) -> None:
    """The add-sanction form's player search works for a Moderators-group account."""
    client = _admin_client(cast["mod"][0])
    found = client.get(
        "/admin/autocomplete/",
        {"app_label": "chat", "model_name": "sanction", "field_name": "user", "term": "bo"},
    )
    assert found.status_code == 200
    assert [r["text"] for r in found.json()["results"]] == ["bob"]


def test_a_refused_sanction_is_a_form_error_not_a_success(
    cast: dict[str, Any], make_user: Any
) -> None:
    other, _ = make_user("mod2")
    other.groups.add(Group.objects.get(name="Moderators"))
    client = _admin_client(cast["mod"][0])
    page = client.post(
        "/admin/chat/sanction/add/",
        {"user": other.pk, "kind": "ban", "reason": "no", "room": ""},
    )
    assert page.status_code == 200  # the form again, with the reason
    assert b"moderators can only be sanctioned by an admin" in page.content
    assert not Sanction.objects.exists()
    banned = client.post(
        "/admin/chat/sanction/add/",
        {"user": cast["bob"][0].pk, "kind": "ban", "reason": "raid", "room": ""},
    )
    assert banned.status_code == 302
    assert Sanction.objects.get().user == cast["bob"][0]
    assert ModerationLog.objects.get().action == "ban"
