"""The chat socket through the real ASGI application, in process (in-memory layer)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore
from prometheus_client import REGISTRY

from chat.models import Message
from esports_chat.asgi import application
from tests.support import ORIGIN, Sock

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def room(make_room: Any) -> Any:
    return make_room("arena")


async def test_hello_names_the_user_and_the_limits(make_user: Any) -> None:
    """The first frame says who the socket is and what the limits are."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token, expect_hello=False)
    hello = await sock.recv()
    assert hello["type"] == "hello"
    assert hello["user"] == "alice"
    assert hello["limits"] == {"body": 500, "frame": 65536}
    await sock.close()


async def test_post_is_acked_and_broadcast_to_every_member_including_sender(
    make_user: Any, room: Any
) -> None:
    """A message reaches every member, the sender too, and the sender gets an ack."""
    _, t1 = await database_sync_to_async(make_user)("alice")
    _, t2 = await database_sync_to_async(make_user)("bob")
    alice, bob = await Sock.open(token=t1), await Sock.open(token=t2)
    await alice.join("arena")
    await bob.join("arena")
    await alice.send({"type": "message", "room": "arena", "body": "glhf", "client_id": "c1"})
    got = await alice.gather("ack", "message")
    ack, mine = got["ack"], got["message"]
    theirs = await bob.expect("message")
    assert ack["client_id"] == "c1" and ack["duplicate"] is False
    assert mine == theirs
    assert theirs["id"] == ack["id"] and theirs["user"] == "alice" and theirs["body"] == "glhf"
    assert theirs["client_id"] == "c1" and theirs["ts"] == ack["ts"]
    await alice.close()
    await bob.close()


async def test_join_returns_recent_history_oldest_first(make_user: Any, room: Any) -> None:
    """Joining shows the newest messages, oldest first, with the default limit."""
    user, token = await database_sync_to_async(make_user)("alice")

    def post_many() -> None:
        from django.utils import timezone

        Message.objects.bulk_create(
            Message(room=room, author=user, body=f"m{i}", created=timezone.now()) for i in range(60)
        )

    await database_sync_to_async(post_many)()
    sock = await Sock.open(token=token)
    joined = await sock.join("arena")
    bodies = [m["body"] for m in joined["history"]]
    assert bodies == [f"m{i}" for i in range(10, 60)]
    assert joined["gap"] is False and joined["title"] == "Arena"
    await sock.close()


async def test_since_returns_exactly_the_messages_after_it(make_user: Any, room: Any) -> None:
    """A reconnecting client gets exactly what it missed, nothing it had."""
    _, t1 = await database_sync_to_async(make_user)("alice")
    writer = await Sock.open(token=t1)
    await writer.join("arena")
    ids = []
    for i in range(5):
        await writer.send({"type": "message", "room": "arena", "body": f"b{i}"})
        ids.append((await writer.expect("ack"))["id"])
    reader = await Sock.open(token=t1)
    joined = await reader.join("arena", since=ids[1])
    assert [m["id"] for m in joined["history"]] == ids[2:]
    again = await reader.join("arena", since=ids[-1])
    assert again["history"] == []
    await writer.close()
    await reader.close()


async def test_json_and_msgpack_clients_share_a_room(make_user: Any, room: Any) -> None:
    """msgpack is chosen when offered, and both formats carry the same frames."""
    _, t1 = await database_sync_to_async(make_user)("alice")
    _, t2 = await database_sync_to_async(make_user)("bob")
    text = await Sock.open(token=t1)
    binary = await Sock.open(token=t2, fmt="msgpack")
    assert binary.subprotocol == "chat.msgpack" and text.subprotocol == "chat.json"
    await text.join("arena")
    await binary.join("arena")
    await binary.send({"type": "message", "room": "arena", "body": "from msgpack"})
    assert (await text.expect("message"))["body"] == "from msgpack"
    await text.send({"type": "message", "room": "arena", "body": "from json"})
    got: list[str] = []
    while len(got) < 2:
        got += [f["body"] for f in await binary.events() if f["type"] == "message"]
    assert got == ["from msgpack", "from json"]
    await text.close()
    await binary.close()


async def test_resent_client_id_gets_the_original_ack_and_no_second_post(
    make_user: Any, room: Any
) -> None:
    """The outbox can resend safely: the server deduplicates by user and client_id, and
    broadcasts a recent original again (same id) in case its first broadcast never happened."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token)
    await sock.join("arena")
    frame = {"type": "message", "room": "arena", "body": "once", "client_id": "k1"}
    await sock.send(frame)
    got = await sock.gather("ack", "message")
    first, broadcast = got["ack"], got["message"]
    await sock.send(frame)
    again = await sock.gather("ack", "message")
    assert again["ack"]["id"] == first["id"] and again["ack"]["duplicate"] is True
    assert again["message"] == broadcast, "the same message, same id: clients drop it by id"
    assert await sock.nothing()
    assert await database_sync_to_async(Message.objects.filter(client_id="k1").count)() == 1
    await sock.close()


async def test_a_resend_of_an_old_message_is_not_broadcast_again(make_user: Any, room: Any) -> None:
    """Past a minute the original's broadcast certainly happened or failed (and was then
    recovered by resync): the resend only gets its duplicate ack."""
    user, token = await database_sync_to_async(make_user)("alice")

    def store_old() -> None:
        from datetime import timedelta

        from django.utils import timezone

        Message.objects.create(
            room=room,
            author=user,
            body="long ago",
            client_id="k2",
            created=timezone.now() - timedelta(minutes=2),
        )

    await database_sync_to_async(store_old)()
    sock = await Sock.open(token=token)
    await sock.join("arena")
    await sock.send({"type": "message", "room": "arena", "body": "long ago", "client_id": "k2"})
    ack = await sock.expect("ack")
    assert ack["duplicate"] is True
    assert await sock.nothing()
    await sock.close()


async def test_typing_reaches_the_others_but_not_the_typer(make_user: Any, room: Any) -> None:
    """Typing is relayed to other members, never echoed, never stored."""
    _, t1 = await database_sync_to_async(make_user)("alice")
    _, t2 = await database_sync_to_async(make_user)("bob")
    alice, bob = await Sock.open(token=t1), await Sock.open(token=t2)
    await alice.join("arena")
    await bob.join("arena")
    await alice.send({"type": "typing", "room": "arena"})
    assert await bob.expect("typing") == {"type": "typing", "room": "arena", "user": "alice"}
    assert await alice.nothing()
    assert await database_sync_to_async(Message.objects.count)() == 0
    await alice.close()
    await bob.close()


async def test_history_pages_back(make_user: Any, room: Any) -> None:
    """`history` returns the page before a given id and says whether more exist."""
    user, token = await database_sync_to_async(make_user)("alice")

    def post_many() -> list[int]:
        from django.utils import timezone

        made = Message.objects.bulk_create(
            Message(room=room, author=user, body=f"m{i}", created=timezone.now()) for i in range(60)
        )
        return sorted(m.pk for m in Message.objects.filter(pk__in=[m.pk for m in made]))

    await database_sync_to_async(post_many)()
    sock = await Sock.open(token=token)
    joined = await sock.join("arena")
    oldest = joined["history"][0]["id"]
    assert joined["history"][0]["body"] == "m10"
    await sock.send({"type": "history", "room": "arena", "before": oldest, "limit": 6})
    page = await sock.expect("history")
    assert [m["body"] for m in page["messages"]] == [f"m{i}" for i in range(4, 10)]
    assert page["more"] is True
    await sock.send({"type": "history", "room": "arena", "before": page["messages"][0]["id"]})
    last = await sock.expect("history")
    assert [m["body"] for m in last["messages"]] == [f"m{i}" for i in range(4)]
    assert last["more"] is False
    await sock.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("this is not json", "bad_frame"),
        ({"type": "dance"}, "bad_frame"),
        ({"type": "join"}, "bad_frame"),
        ({"type": "join", "room": "nowhere"}, "unknown_room"),
        ({"type": "message", "room": "arena", "body": "hi"}, "not_joined"),
        ({"type": "history", "room": "arena"}, "not_joined"),
        ({"type": "leave", "room": "arena"}, "not_joined"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_lives_on(
    make_user: Any, room: Any, frame: Any, code: str
) -> None:
    """Each bad input gets its documented error code, then the socket still works."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token)
    if isinstance(frame, str):
        await sock.c.send_to(text_data=frame)
    else:
        await sock.send(frame)
    error = await sock.expect("error")
    assert error["code"] == code
    await sock.send({"type": "ping", "n": 5})
    assert await sock.expect("pong") == {"type": "pong", "n": 5}
    await sock.close()


async def test_too_long_and_empty_bodies_are_refused(make_user: Any, room: Any) -> None:
    """Bodies past the limit get too_long with the limit; blank bodies get empty."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token)
    await sock.join("arena")
    await sock.send({"type": "message", "room": "arena", "body": "x" * 501, "client_id": "c"})
    error = await sock.expect("error")
    assert (error["code"], error["ref"], error["limit"]) == ("too_long", "c", 500)
    await sock.send({"type": "message", "room": "arena", "body": " \u200e\n "})
    assert (await sock.expect("error"))["code"] in {"empty"}
    assert await database_sync_to_async(Message.objects.count)() == 0
    await sock.close()


async def test_msgpack_garbage_gets_bad_frame(make_user: Any) -> None:
    """Undecodable binary input on a msgpack socket is answered, not fatal."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token, fmt="msgpack")
    await sock.c.send_to(bytes_data=b"\xc1\xff\x00")
    assert (await sock.expect("error"))["code"] == "bad_frame"
    await sock.send({"type": "ping"})
    assert (await sock.expect("pong"))["type"] == "pong"
    await sock.close()


async def test_oversized_frame_closes_with_4009(make_user: Any) -> None:
    """A frame over the size limit closes the socket with 4009 (frame too big)."""
    _, token = await database_sync_to_async(make_user)("alice")
    sock = await Sock.open(token=token)
    await sock.c.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * 70_000}))
    out = await sock.recv_raw()
    assert out == {"type": "websocket.close", "code": 4009}


async def test_anonymous_reads_public_rooms_but_cannot_post(room: Any) -> None:
    """A visitor without an account may join a public room and gets auth_required on posting."""
    sock = await Sock.open()  # same-origin page, no session
    hello_user = None
    joined = await sock.join("arena")
    assert joined["room"] == "arena"
    await sock.send({"type": "message", "room": "arena", "body": "hi"})
    assert (await sock.expect("error"))["code"] == "auth_required"
    await sock.send({"type": "typing", "room": "arena"})
    assert (await sock.expect("error"))["code"] == "auth_required"
    assert hello_user is None
    await sock.close()


async def test_members_only_room_refuses_outsiders(make_user: Any, make_room: Any) -> None:
    """Members-only rooms: members join, others get forbidden, visitors auth_required."""
    member, t1 = await database_sync_to_async(make_user)("alice")
    _, t2 = await database_sync_to_async(make_user)("bob")

    def make() -> None:
        private = make_room("team", is_public=False)
        private.members.add(member)

    await database_sync_to_async(make)()
    alice, bob, visitor = await Sock.open(token=t1), await Sock.open(token=t2), await Sock.open()
    assert (await alice.join("team"))["room"] == "team"
    await bob.send({"type": "join", "room": "team"})
    assert (await bob.expect("error"))["code"] == "forbidden"
    await visitor.send({"type": "join", "room": "team"})
    assert (await visitor.expect("error"))["code"] == "auth_required"
    for s in (alice, bob, visitor):
        await s.close()


async def test_session_cookie_authenticates_a_same_origin_socket(make_user: Any) -> None:
    """A logged-in page's socket is that user, via the session cookie."""
    user, _ = await database_sync_to_async(make_user)("alice")

    def session_key() -> str:
        store = SessionStore()
        store["_auth_user_id"] = str(user.pk)
        store["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
        store["_auth_user_hash"] = user.get_session_auth_hash()
        store.create()
        return str(store.session_key)

    key = await database_sync_to_async(session_key)()
    headers = [*ORIGIN, (b"cookie", f"sessionid={key}".encode())]
    sock = await Sock.open(headers=headers, expect_hello=False)
    assert (await sock.recv())["user"] == "alice"
    await sock.close()


async def test_foreign_origin_is_refused_at_the_handshake() -> None:
    """A page on another site cannot open a socket here (cross-site socket hijacking)."""
    communicator = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[(b"origin", b"http://evil.example"), (b"host", b"testserver")],
    )
    connected, _ = await communicator.connect()
    assert not connected


async def test_cookie_without_origin_is_refused(make_user: Any) -> None:
    """With no Origin a socket needs a token: a session cookie alone is not enough."""
    communicator = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"host", b"testserver"), (b"cookie", b"sessionid=x")]
    )
    connected, _ = await communicator.connect()
    assert not connected


async def test_token_without_origin_is_accepted(make_user: Any) -> None:
    """Native clients and bots send no Origin and connect with a token."""
    _, token = await database_sync_to_async(make_user)("bot")
    sock = await Sock.open(token=token, headers=[(b"host", b"testserver")], expect_hello=False)
    assert (await sock.recv())["user"] == "bot"
    await sock.close()


@pytest.mark.parametrize("token", ["forged", "eyJ1IjoxLCJuIjoiYWxpY2UifQ:1vA:bad"])
async def test_bad_token_gets_an_error_and_close_4001(token: str) -> None:
    """Forged or malformed tokens are told why and closed with 4001 (do not reconnect)."""
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}")
    connected, _ = await communicator.connect()
    assert connected
    error = json.loads((await communicator.receive_output(2))["text"])
    assert error["type"] == "error" and error["code"] == "auth_required"
    assert await communicator.receive_output(2) == {"type": "websocket.close", "code": 4001}


async def test_expired_token_is_refused(make_user: Any, settings: Any) -> None:
    """Tokens expire after CHAT_TOKEN_MAX_AGE."""
    _, token = await database_sync_to_async(make_user)("alice")
    settings.CHAT_TOKEN_MAX_AGE = -1
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}")
    await communicator.connect()
    await communicator.receive_output(2)
    assert await communicator.receive_output(2) == {"type": "websocket.close", "code": 4001}


async def test_leave_stops_deliveries(make_user: Any, room: Any) -> None:
    """After `left`, the room's events no longer reach the socket."""
    _, t1 = await database_sync_to_async(make_user)("alice")
    _, t2 = await database_sync_to_async(make_user)("bob")
    alice, bob = await Sock.open(token=t1), await Sock.open(token=t2)
    await alice.join("arena")
    await bob.join("arena")
    await bob.send({"type": "leave", "room": "arena"})
    assert await bob.expect("left") == {"type": "left", "room": "arena"}
    await alice.send({"type": "message", "room": "arena", "body": "anyone?"})
    await alice.gather("ack", "message")
    assert await bob.nothing()
    await alice.close()
    await bob.close()


async def test_posts_arriving_together_are_stored_as_one_batch_in_order(
    make_user: Any, room: Any
) -> None:
    """Posts that queue while the database thread is busy are stored in one transaction; each
    sender still gets its own ack, a refused post (too long) is refused alone, and every member
    sees the new messages once, in id order."""
    socks = []
    for name in ("alice", "bob", "carol", "dave"):
        _, token = await database_sync_to_async(make_user)(name)
        sock = await Sock.open(token=token)
        await sock.join("arena")
        socks.append(sock)
    batches_before = _sample("chat_db_batch_size_count", kind="post")
    posts_before = _sample("chat_db_batch_size_sum", kind="post")
    for round_ in range(3):
        for index, sock in enumerate(socks):
            body = "x" * 501 if (round_, index) == (1, 2) else f"r{round_} s{index}"
            await sock.send(
                {
                    "type": "message",
                    "room": "arena",
                    "body": body,
                    "client_id": f"{round_}{index}",
                }
            )
    answers = [[await s.gather_any("ack", "error") for _ in range(3)] for s in socks]
    refused = [a for per_sock in answers for a in per_sock if a["type"] == "error"]
    assert [(e["code"], e["ref"]) for e in refused] == [("too_long", "12")]
    acks = sorted(a["id"] for per_sock in answers for a in per_sock if a["type"] == "ack")
    assert len(acks) == 11
    batches = _sample("chat_db_batch_size_count", kind="post") - batches_before
    assert _sample("chat_db_batch_size_sum", kind="post") - posts_before == 12
    assert batches < 12, "posts that arrived together shared a batch"
    for sock in socks:
        seen = [(await sock.expect("message"))["id"] for _ in range(11)]
        assert seen == acks
    stored = await database_sync_to_async(
        lambda: list(Message.objects.order_by("id").values_list("id", flat=True))
    )()
    assert stored == acks
    for sock in socks:
        await sock.close()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_joins_arriving_together_share_their_reads_and_keep_their_answers(
    make_user: Any, make_room: Any
) -> None:
    """Joins that queue while the database thread is busy are read as one batch: a member and
    outsiders of a members-only room, a user banned from a public room and an unknown slug each
    get their own answer, and the members of the public room all get the same history."""
    alice, t_alice = await database_sync_to_async(make_user)("alice")
    _, t_bob = await database_sync_to_async(make_user)("bob")
    mallory, t_mallory = await database_sync_to_async(make_user)("mallory")

    def setup() -> None:
        from django.utils import timezone

        from chat.models import Sanction

        arena = make_room("arena")
        make_room("team", is_public=False).members.add(alice)
        Sanction.objects.create(
            user=mallory, room=arena, kind="ban", reason="spam", created=timezone.now()
        )
        Message.objects.bulk_create(
            Message(room=arena, author=alice, body=f"m{i}", created=timezone.now())
            for i in range(5)
        )

    await database_sync_to_async(setup)()
    socks = {
        name: await Sock.open(token=token)
        for name, token in (("alice", t_alice), ("bob", t_bob), ("mallory", t_mallory))
    }
    socks["visitor"] = await Sock.open()
    batches_before = _sample("chat_db_batch_size_count", kind="join")
    asks = [
        ("alice", "team"), ("bob", "team"), ("visitor", "team"), ("mallory", "arena"),
        ("alice", "arena"), ("bob", "arena"), ("visitor", "arena"), ("bob", "nowhere"),
    ]  # fmt: skip
    for name, room in asks:
        await socks[name].send({"type": "join", "room": room})
    answers = {}
    for name, room in asks:
        frame = await socks[name].gather_any("joined", "error")
        answers[name, room] = frame["code"] if frame["type"] == "error" else frame["history"]
    assert _sample("chat_db_batch_size_count", kind="join") - batches_before < len(asks)
    assert answers["alice", "team"] == []
    assert answers["bob", "team"] == "forbidden"
    assert answers["visitor", "team"] == "auth_required"
    assert answers["mallory", "arena"] == "banned"
    assert answers["bob", "nowhere"] == "unknown_room"
    histories = [answers[name, "arena"] for name in ("alice", "bob", "visitor")]
    assert [m["body"] for m in histories[0]] == [f"m{i}" for i in range(5)]
    assert histories[1] == histories[0] and histories[2] == histories[0]
    for sock in socks.values():
        await sock.close()


async def test_an_unknown_socket_path_is_refused_at_the_handshake() -> None:
    """Only /ws/chat/ takes sockets; any other path gets the handshake refused (HTTP 403)."""
    communicator = WebsocketCommunicator(application, "/ws/other/", headers=ORIGIN)
    connected, _ = await communicator.connect()
    assert connected is False
    await communicator.disconnect()


async def test_a_resend_queued_behind_its_original_is_its_duplicate(
    make_user: Any, room: Any
) -> None:
    """Two copies of one post (same client_id) in one batch: the second is answered as the
    first's duplicate, without meeting the abuse limits as a repeat, and stored once."""
    from chat import services
    from chat.selectors import room_get

    user, _ = await database_sync_to_async(make_user)("alice")
    other, _ = await database_sync_to_async(make_user)("bob")
    info = await database_sync_to_async(room_get)(slug="arena")
    assert info is not None
    requests = [
        services.PostRequest(user_id=user.pk, room=info, body="twice", client_id="same"),
        services.PostRequest(user_id=other.pk, room=info, body="bystander", client_id="b1"),
        services.PostRequest(user_id=user.pk, room=info, body="twice", client_id="same"),
    ]
    first, bystander, copy = await database_sync_to_async(services.message_post_many)(requests)
    assert isinstance(first, services.PostResult) and first.duplicate is False
    assert isinstance(bystander, services.PostResult) and bystander.duplicate is False
    assert isinstance(copy, services.PostResult) and copy.duplicate is True
    assert copy.frame == first.frame
    assert await database_sync_to_async(_client_ids)() == ["b1", "same"]


def _client_ids() -> list[str]:
    return sorted(c or "" for c in Message.objects.values_list("client_id", flat=True))
