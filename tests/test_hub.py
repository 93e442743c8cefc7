"""The hub's fan-out rules, driven directly with recording sockets (no server, no Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from chat import protocol
from chat.hub import EVENT_TYPE, Connection, Hub, get_hub
from chat.protocol import CloseCode, WireFormat


class Socket:
    """Records what the hub writes, like a server's ASGI send that never blocks."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(e["text"]) for e in self.events if e["type"] == "websocket.send"]

    def closes(self) -> list[int]:
        return [e["code"] for e in self.events if e["type"] == "websocket.close"]


def event(room_id: int, frame: dict[str, Any]) -> dict[str, Any]:
    return {"type": EVENT_TYPE, "room": room_id, "frame": frame, "at": time.time()}


def chat(i: int, user: str = "alice") -> dict[str, Any]:
    return protocol.message(room="r", id=i, user=user, body=f"m{i}", ts=0)


async def member(hub: Hub, room_id: int = 1, user: str = "bob") -> tuple[Connection, Socket]:
    socket = Socket()
    conn = Connection(socket.send, fmt=WireFormat.JSON, user_id=hash(user) % 1000, username=user)
    hub.register(conn)
    await hub.join(conn, room_id, "r")
    hub.join_complete(conn, room_id, 0)
    return conn, socket


@pytest.fixture
async def hub(settings: Any) -> Hub:
    settings.CHAT_BATCH_WINDOW_MS = 50
    return await get_hub()


async def test_first_event_in_a_quiet_room_goes_out_at_once(hub: Hub) -> None:
    """No batching delay for a quiet room: the event is written before any timer runs."""
    _, socket = await member(hub)
    hub._on_room_event(event(1, chat(1)))
    assert socket.frames() == [chat(1)]


async def test_events_inside_the_window_leave_as_one_batch(hub: Hub) -> None:
    """A burst becomes one batch frame per socket, in publish order."""
    _, socket = await member(hub)
    for i in range(1, 6):
        hub._on_room_event(event(1, chat(i)))
    assert socket.frames() == [chat(1)]
    await asyncio.sleep(0.08)
    assert socket.frames() == [chat(1), protocol.batch([chat(i) for i in range(2, 6)])]


async def test_room_is_quiet_again_after_a_window_without_events(hub: Hub) -> None:
    _, socket = await member(hub)
    hub._on_room_event(event(1, chat(1)))
    await asyncio.sleep(0.08)
    hub._on_room_event(event(1, chat(2)))
    assert socket.frames() == [chat(1), chat(2)]


async def test_zero_window_disables_batching(settings: Any) -> None:
    settings.CHAT_BATCH_WINDOW_MS = 0
    hub = await get_hub()
    _, socket = await member(hub)
    for i in range(3):
        hub._on_room_event(event(1, chat(i)))
    assert socket.frames() == [chat(0), chat(1), chat(2)]


async def test_a_room_whose_flush_is_slow_gets_a_longer_window(settings: Any) -> None:
    """The window stretches to twice what the last flush took (up to the maximum): an
    event that would have opened a new window in a cheap room waits in an expensive one."""
    settings.CHAT_BATCH_WINDOW_MS, settings.CHAT_BATCH_WINDOW_MAX_MS = 20, 500
    hub = await get_hub()
    _, socket = await member(hub)
    slow = Socket()

    async def slow_send(event: dict[str, Any]) -> None:
        time.sleep(0.05)  # noqa: ASYNC251  (a write that holds the loop, as thousands would)
        slow.events.append(event)

    conn = Connection(slow_send, fmt=WireFormat.JSON, user_id=7, username="carol")
    hub.register(conn)
    await hub.join(conn, 1, "r")
    hub.join_complete(conn, 1, 0)
    hub._on_room_event(event(1, chat(1)))
    room = hub.rooms[1]
    assert 0.1 <= room.window <= 0.5
    await asyncio.sleep(0.05)  # past the configured 20 ms, inside the stretched window
    hub._on_room_event(event(1, chat(2)))
    assert socket.frames() == [chat(1)], "held for the stretched window"
    await asyncio.sleep(room.window + 0.05)
    assert socket.frames() == [chat(1), chat(2)]
    await asyncio.sleep(0.6)
    settings.CHAT_BATCH_WINDOW_MAX_MS = 0
    assert Hub(hub.layer).max_window == 0.02, "the maximum never undercuts the window"


async def test_every_json_member_gets_the_same_encoded_event(hub: Hub) -> None:
    """Encode once per message per process: one event object shared by every socket."""
    sockets = [(await member(hub, user=f"u{i}"))[1] for i in range(20)]
    hub._on_room_event(event(1, chat(1)))
    first = sockets[0].events[0]
    assert all(s.events[0] is first for s in sockets)


async def test_msgpack_members_get_binary_frames(hub: Hub) -> None:
    socket = Socket()
    conn = Connection(socket.send, fmt=WireFormat.MSGPACK, user_id=7, username="m")
    hub.register(conn)
    await hub.join(conn, 1, "r")
    hub.join_complete(conn, 1, 0)
    hub._on_room_event(event(1, chat(1)))
    assert socket.events[0]["bytes"] == protocol.dumps(chat(1), WireFormat.MSGPACK)


async def test_typing_skips_the_typer_even_inside_a_batch(hub: Hub) -> None:
    """The typer's own sockets get the batch without their typing event."""
    _, alice = await member(hub, user="alice")
    _, bob = await member(hub, user="bob")
    hub._on_room_event(event(1, chat(1)))
    hub._on_room_event(event(1, protocol.typing(room="r", user="alice")))
    hub._on_room_event(event(1, chat(2)))
    await asyncio.sleep(0.08)
    typing = protocol.typing(room="r", user="alice")
    assert bob.frames()[-1] == protocol.batch([typing, chat(2)])
    assert alice.frames()[-1] == chat(2)


async def test_held_events_during_a_join_are_released_without_duplicates(hub: Hub) -> None:
    """A joining socket gets nothing before `joined`, and nothing its history already had."""
    socket = Socket()
    conn = Connection(socket.send, fmt=WireFormat.JSON, user_id=1, username="late")
    hub.register(conn)
    await hub.join(conn, 1, "r")
    hub._on_room_event(event(1, chat(5)))
    await asyncio.sleep(0.08)
    hub._on_room_event(event(1, chat(6)))
    await asyncio.sleep(0.08)
    assert socket.frames() == []
    hub.join_complete(conn, 1, last_id=5)  # history already held message 5
    assert socket.frames() == [chat(6)]


async def test_a_socket_that_stops_confirming_is_shed_then_closed_4008(
    hub: Hub, settings: Any
) -> None:
    """Past the shed mark typing is skipped for that socket; past the limit it is closed."""
    settings.CHAT_BATCH_WINDOW_MS = 0
    settings.CHAT_OUTBOUND_SHED_BYTES = 4096
    settings.CHAT_OUTBOUND_LIMIT_BYTES = 16384
    settings.CHAT_FLOW_PING_BYTES = 1024
    hub.window = 0
    slow, slow_socket = await member(hub, user="slow")
    fast, fast_socket = await member(hub, user="fast")
    big = "x" * 400
    for i in range(30):
        hub._on_room_event(event(1, protocol.message(room="r", id=i, user="a", body=big, ts=0)))
        for frame in fast_socket.frames():
            if frame["type"] == "ping":
                fast.pong(frame["n"])
        fast_socket.events.clear()
    hub._on_room_event(event(1, protocol.typing(room="r", user="a")))
    assert not any(f["type"] == "typing" for f in slow_socket.frames())
    assert fast_socket.frames() == [protocol.typing(room="r", user="a")]
    for i in range(30, 60):
        hub._on_room_event(event(1, protocol.message(room="r", id=i, user="a", body=big, ts=0)))
        for frame in fast_socket.frames():
            if frame["type"] == "ping":
                fast.pong(frame["n"])
    assert slow_socket.closes() == [CloseCode.SLOW_CONSUMER]
    assert slow.closed and slow not in hub.rooms[1].members
    assert not fast.closed and fast_socket.closes() == []
    messages = [f for f in slow_socket.frames() if f["type"] == "message"]
    assert messages == sorted(messages, key=lambda f: f["id"])  # nothing skipped before close
    assert len(messages) == messages[-1]["id"] + 1


async def test_pong_credit_only_counts_for_a_ping_actually_sent(hub: Hub) -> None:
    """A client cannot earn credit with made-up pongs."""
    conn, socket = await member(hub)
    conn.send_frame(protocol.message(room="r", id=1, user="a", body="x" * 100, ts=0))
    conn.pong(12345)
    assert conn.outstanding > 0
    conn.ping()
    nonce = socket.frames()[-1]["n"]
    conn.pong(nonce)
    assert conn.acked_bytes > 0


async def test_heartbeat_closes_silent_sockets_and_pings_the_rest(hub: Hub, settings: Any) -> None:
    settings.CHAT_HEARTBEAT_TIMEOUT = 1.0
    silent, silent_socket = await member(hub, user="silent")
    _, alive_socket = await member(hub, user="alive")
    silent.last_pong -= 5
    hub.heartbeat()
    assert silent_socket.closes() == [CloseCode.HEARTBEAT_TIMEOUT]
    assert silent not in hub.rooms[1].members
    assert [f["type"] for f in alive_socket.frames()] == ["ping"]
    assert alive_socket.closes() == []


async def test_a_parked_send_queues_later_writes_in_order() -> None:
    """When the server parks a send (Uvicorn's flow control), later frames wait behind it."""
    gate = asyncio.Event()
    written: list[str] = []

    async def send(event: dict[str, Any]) -> None:
        await gate.wait()
        written.append(event["text"])

    conn = Connection(send, fmt=WireFormat.JSON, user_id=1, username="u")
    for i in range(3):
        assert conn.write({"type": "websocket.send", "text": str(i)}, 1)
    assert conn.writer is not None and written == []
    gate.set()
    await asyncio.sleep(0.01)
    assert written == ["0", "1", "2"]
    assert conn.writer is None


async def test_leaving_the_last_member_drops_the_room(hub: Hub) -> None:
    conn, _ = await member(hub)
    await hub.leave(conn, 1)
    assert 1 not in hub.rooms
    await hub.unregister(conn)
    assert conn not in hub.connections
