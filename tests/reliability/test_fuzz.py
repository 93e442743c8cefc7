"""Garbage on the wire of a real Daphne process: every bad socket gets an error frame or a
documented close, the process never dies, and the other sockets never notice.

tests/test_protocol.py fuzzes the frame parser itself (hypothesis, JSON and msgpack); these
tests send the bytes through Daphne and the whole application: handshakes that are not HTTP,
frames that break RFC 6455, truncated and huge frames, invalid UTF-8, deep nesting, floods,
and hypothesis-generated sequences of arbitrary frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.protocol import ErrorCode
from tests.reliability.conftest import FAST
from tests.reliability.harness import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Member,
    RawSocket,
    alive,
    until,
)
from tests.support import ServerProcess, free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]

APP_FRAME_LIMIT = 16_384  # CHAT_MAX_FRAME_BYTES here; Daphne's own cap is 65,536
# The closes docs/protocol.md documents for a misbehaving client. None is a connection
# dropped without a close frame (1006 to the client): Daphne's answer (autobahn's
# failByDrop) to every RFC 6455 violation, to invalid UTF-8 and to a message over its cap.
DOCUMENTED = {1002, 1007, 1009, 4009, 4010, 4029, None}
DROPPED: set[int | None] = {None}
ERROR_CODES = {code.value for code in ErrorCode}


@dataclass
class Target:
    server: ServerProcess
    token: str
    witnesses: list[Member]

    @property
    def port(self) -> int:
        return self.server.port

    async def still_serving(self) -> None:
        """The process is alive and the witnesses still talk to each other."""
        assert self.server.proc is not None and alive(self.server.proc.pid)
        speaker, listener = self.witnesses
        client_id = await speaker.post("final", f"still there {os.urandom(4).hex()}")
        await until(lambda: client_id in speaker.acked, 10, "the witness's post acked")
        await until(
            lambda: speaker.acked[client_id] in listener.seen["final"], 10, "witness fan-out"
        )
        assert all(m.connects == 1 for m in self.witnesses), "no witness lost its socket"
        log = self.server.log()
        assert "Traceback" not in log, f"the application logged an error: {log[-3000:]}"
        for member in self.witnesses:
            await member.stop()


@pytest.fixture
def target(
    servers: Callable[..., ServerProcess],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
) -> Iterator[Target]:
    make_room("final")
    env = {
        **FAST,
        "CHAT_METRICS_PORT": str(free_port()),
        "CHAT_MAX_FRAME_BYTES": str(APP_FRAME_LIMIT),
        "CHAT_SOCKET_FRAMES_PER_10S": "300",  # the default flood limit
        "CHAT_HEARTBEAT_INTERVAL": "0.5",
        "CHAT_HEARTBEAT_TIMEOUT": "2",
    }
    server = servers("daphne", **env)
    (_, fuzz_token), (_, a), (_, b) = make_user("fuzz"), make_user("w1"), make_user("w2")
    witnesses = [
        Member(name, t, lambda: [server.url], ["final"]) for name, t in (("w1", a), ("w2", b))
    ]
    yield Target(server, fuzz_token, witnesses)


async def _start(target: Target) -> None:
    for member in target.witnesses:
        member.start()
    for member in target.witnesses:
        await member.ready()


async def _outcome(raw: RawSocket, timeout: float = 8.0) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the server sent until it closed (answering no ping): (frames, close code)."""
    frames = await raw.read_until_closed(timeout)
    raw.close()
    return frames, raw.close_code


def _check(frames: list[dict[str, Any]], code: int | None, what: str) -> None:
    for frame in frames:
        if frame.get("type") == "error":
            assert frame["code"] in ERROR_CODES, (what, frame)
    assert code in DOCUMENTED, (what, code, frames[-3:])


async def _fresh(target: Target, subprotocol: str = "chat.json") -> RawSocket:
    raw = await RawSocket.connect(target.port, token=target.token, subprotocol=subprotocol)
    assert raw.status == 101
    assert (await raw.next_json())["type"] == "hello"
    return raw


async def _answer(raw: RawSocket) -> dict[str, Any]:
    """The next answer to this socket's own frames; pings are answered, presence skipped."""
    while True:
        frame = await raw.next_json(5)
        if frame["type"] == "ping":
            await raw.send_json({"type": "pong", "n": frame["n"]})
        elif frame["type"] != "presence":
            return frame


def _close_payload(code: int) -> bytes:
    return struct.pack("!H", code)


# (name, subprotocol, frames to send as raw bytes builder, expected close codes or "error")
def _cases() -> list[tuple[str, str, list[bytes], set[int | None] | str]]:
    from tests.reliability.harness import client_frame as f

    nested_json = ("[" * 5000 + "]" * 5000).encode()
    nested_msgpack = b"\x91" * 5000 + b"\x90"
    return [
        ("garbage frame bytes", "chat.json", [os.urandom(512)], DROPPED),
        ("unmasked frame", "chat.json", [f(OP_TEXT, b'{"type":"ping"}', mask=False)], DROPPED),
        ("reserved bits", "chat.json", [f(OP_TEXT, b'{"type":"ping"}', rsv=0b100)], DROPPED),
        ("reserved opcode 3", "chat.json", [f(3, b"x")], DROPPED),
        ("reserved control opcode 11", "chat.json", [f(11, b"x")], DROPPED),
        ("fragmented ping", "chat.json", [f(OP_PING, b"x", fin=False)], DROPPED),
        ("ping over 125 bytes", "chat.json", [f(OP_PING, b"x" * 126)], DROPPED),
        ("continuation with no start", "chat.json", [f(0, b"x")], DROPPED),
        ("new message inside a fragmented one", "chat.json",
         [f(OP_TEXT, b'{"type"', fin=False), f(OP_TEXT, b":1}")], DROPPED),
        ("close with a reserved code", "chat.json", [f(OP_CLOSE, _close_payload(1005))], DROPPED),
        ("close with a one-byte payload", "chat.json", [f(OP_CLOSE, b"\x03")], DROPPED),
        ("invalid UTF-8 text", "chat.json", [f(OP_TEXT, b'{"type":"\xff\xfe"}')], DROPPED),
        ("invalid UTF-8 split over fragments", "chat.json",
         [f(OP_TEXT, b'{"a":"\xe2\x82', fin=False), f(0, b'\x28"}')], DROPPED),
        ("over the app frame limit", "chat.json",
         [f(OP_TEXT, json.dumps({"type": "ping", "pad": "x" * 30000}).encode())], {4009}),
        ("over Daphne's message limit", "chat.json",
         [f(OP_TEXT, b"x" * 200_000)], DROPPED),
        ("huge length header, no payload", "chat.json",
         [f(OP_BINARY, b"", length=2**62)], DROPPED),
        ("flood of tiny frames", "chat.json",
         [f(OP_TEXT, b'{"type":"ping"}') for _ in range(400)], {4029}),
        ("deeply nested JSON", "chat.json", [f(OP_TEXT, nested_json)], "error"),
        ("deeply nested msgpack", "chat.msgpack", [f(OP_BINARY, nested_msgpack)], "error"),
        ("binary garbage on a JSON socket", "chat.json", [f(OP_BINARY, os.urandom(300))], "error"),
        ("text on a msgpack socket", "chat.msgpack", [f(OP_TEXT, b'{"type":"ping"}')], "error"),
        ("JSON that is not a frame", "chat.json",
         [f(OP_TEXT, b"[1,2,3]"), f(OP_TEXT, b'{"type":"message","room":{"$gt":""}}'),
          f(OP_TEXT, b'{"type":"join","room":"final","since":1e400}')], "error"),
        ("msgpack extension types", "chat.msgpack",
         [f(OP_BINARY, msgpack.packb({"type": msgpack.ExtType(5, b"xx")}))], "error"),
        ("empty frames", "chat.json", [f(OP_TEXT, b""), f(OP_BINARY, b"")], "error"),
    ]  # fmt: skip


async def test_malformed_frames_get_an_error_or_a_documented_close(target: Target) -> None:
    """Each case on its own socket: protocol violations close with 1002, invalid UTF-8 with
    1007, oversized frames with 4009 (ours) or a drop (Daphne's cap), floods with 4029, and
    frames that are valid WebSocket but not valid chat get `error bad_frame` and stay open."""
    await _start(target)
    seen: dict[str, Any] = {}
    for name, subprotocol, frames, expected in _cases():
        raw = await _fresh(target, subprotocol)
        for frame in frames:
            try:
                await raw.send_raw(frame)
            except OSError:
                break  # the server already hung up on an earlier frame
        if expected == "error":
            answers = [await _answer(raw) for _ in frames]
            assert all(a["type"] == "error" and a["code"] == "bad_frame" for a in answers), (
                name,
                answers,
            )
            await raw.send_json({"type": "ping", "n": 7})  # and the socket still works
            last = await _answer(raw)
            assert last["type"] == "pong", (name, answers, last)
            raw.close()
            seen[name] = "error bad_frame"
            continue
        got, code = await _outcome(raw)
        _check(got, code, name)
        assert code in expected, (name, code, got[-3:])
        seen[name] = code
    for name, result in seen.items():
        print(f"fuzz: {name}: {result}")
    await target.still_serving()


async def test_broken_handshakes_and_truncated_frames(target: Target) -> None:
    """Random bytes instead of an HTTP request, a request cut short, a frame whose payload
    never comes: the server answers 400 or hangs up, and a half-sent frame leaves a socket the
    heartbeat closes (4010) like any other silent one."""
    await _start(target)
    for payload in (
        os.urandom(2048),
        b"GET /ws/chat/ HTTP/1.1\r\nHost: x\r\nUpgr",
        b"\x00" * 100,
        b"\r\n" * 50,
    ):
        raw = await RawSocket.connect(target.port, handshake=False)
        await raw.send_raw(payload)
        # The rest of the request never comes. (A client that stays silent instead is
        # dropped by Twisted's idle timeout for requests, 60 s, like any slow request.)
        raw.sock.shutdown(socket.SHUT_WR)
        while not raw.eof and b"\r\n" not in raw.buf:
            if not await raw.fill(10):
                break
        assert raw.eof or raw.buf.startswith(b"HTTP/1.1 400"), raw.buf[:60]
        raw.close()
    half = await _fresh(target)
    from tests.reliability.harness import client_frame

    await half.send_raw(client_frame(OP_TEXT, b"x" * 1000)[:40])
    frames, code = await _outcome(half, 10)
    assert code == 4010, (code, frames[-3:])
    await target.still_serving()


frame_strategy = st.tuples(
    st.sampled_from([OP_TEXT, OP_BINARY, 0, 3, OP_CLOSE, OP_PING, 10, 15]),
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda v: json.dumps(v).encode(), st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda kids: (
                st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
            ),
            max_leaves=10,
        )),
        st.builds(
            lambda kind, room: json.dumps({"type": kind, "room": room}).encode(),
            st.sampled_from(["join", "leave", "message", "typing", "history", "ping", "pong"]),
            st.one_of(st.just("final"), st.text(max_size=70)),
        ),
    ),
    st.booleans(),  # fin
    st.integers(min_value=0, max_value=7),  # rsv
    st.booleans(),  # mask
)  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(frame_strategy, min_size=1, max_size=6))
def test_random_frame_sequences(
    target: Target, frames: list[tuple[int, bytes, bool, int, bool]]
) -> None:
    """Any sequence of frames, well-formed or not: the socket gets only well-formed chat
    frames back (errors with documented codes) and, if it is closed, a documented close."""
    from tests.reliability.harness import client_frame

    async def run() -> None:
        raw = await _fresh(target)
        for opcode, payload, fin, rsv, mask in frames:
            try:
                await raw.send_raw(client_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask))
            except OSError:
                break
        try:
            got = await raw.read_until_closed(1.0)
            code: int | None = raw.close_code
        except TimeoutError:
            got, code = [], 1000  # still open after a second of quiet: fine
        raw.close()
        _check(got, code if code != 1000 else None, repr(frames)[:200])
        assert target.server.proc is not None and alive(target.server.proc.pid)

    asyncio.run(run())


async def test_the_server_still_serves_after_the_random_sequences(target: Target) -> None:
    """Run after the hypothesis test on a fresh process: the witnesses' check in a loop of
    random-byte sockets, and no application error in the log."""
    await _start(target)
    for _ in range(20):
        raw = await _fresh(target)
        await raw.send_raw(os.urandom(64))
        await _outcome(raw)
    await target.still_serving()
