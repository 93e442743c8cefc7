"""The wire protocol, v1: every client frame parsed here, every server frame built here.

No I/O lives in this module. A frame on the wire is a map with a "type" key: JSON text
frames by default, binary msgpack maps when the client offered the `chat.msgpack`
subprotocol. `parse` turns untrusted bytes into one of the small frame classes below or
raises ProtocolError; the functions named after server frames build the maps the server
sends, and `Encoded` turns one of them into wire bytes once, however many sockets get it.
docs/protocol.md is the reference for clients and must say the same as this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import orjson

VERSION: Final = 1
SUBPROTOCOL_JSON: Final = "chat.json"
SUBPROTOCOL_MSGPACK: Final = "chat.msgpack"

ROOM_MAX_LENGTH: Final = 64
CLIENT_ID_MAX_LENGTH: Final = 64

Frame = dict[str, Any]


class WireFormat(enum.Enum):
    JSON = "json"
    MSGPACK = "msgpack"


def select_subprotocol(offered: Sequence[str]) -> tuple[WireFormat, str | None]:
    """Pick the wire format from the subprotocols a client offered, msgpack first."""
    if SUBPROTOCOL_MSGPACK in offered:
        return WireFormat.MSGPACK, SUBPROTOCOL_MSGPACK
    if SUBPROTOCOL_JSON in offered:
        return WireFormat.JSON, SUBPROTOCOL_JSON
    return WireFormat.JSON, None


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses. docs/protocol.md says what a client does on each.

    The application's own closes use 4000-4999: Daphne's WebSocket layer lets an application
    send only 1000 and 3000-4999, so "too big" and "try again" are 4009 and 4013 here, the
    standard 1009 and 1013 plus 3000. 1009 still reaches a client when the ASGI server's own
    frame limit (set above ours) trips first.
    """

    NORMAL = 1000
    # Clients must not reconnect after UNAUTHORIZED (until they have a new token) nor after
    # BANNED; after every other code they reconnect, with backoff, and re-join with since.
    UNAUTHORIZED = 4001
    BANNED = 4003
    SLOW_CONSUMER = 4008
    RESTARTING = 4012
    FRAME_TOO_BIG = 4009
    HEARTBEAT_TIMEOUT = 4010
    TRY_AGAIN = 4013
    FLOOD = 4029


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame. The socket stays open after every one of them."""

    BAD_FRAME = "bad_frame"
    TOO_LONG = "too_long"
    EMPTY = "empty"
    UNKNOWN_ROOM = "unknown_room"
    NOT_JOINED = "not_joined"
    AUTH_REQUIRED = "auth_required"
    FORBIDDEN = "forbidden"
    ROOM_ARCHIVED = "room_archived"
    TOO_MANY_ROOMS = "too_many_rooms"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # abuse limits and moderation
    RATE_LIMITED = "rate_limited"
    SLOW_MODE = "slow_mode"
    REPEATED = "repeated"
    TOO_MANY_MENTIONS = "too_many_mentions"
    READ_ONLY = "read_only"
    BANNED = "banned"
    BAD_COMMAND = "bad_command"


class ProtocolError(Exception):
    """A frame the server will not act on; the sender gets an `error` frame built from it."""

    def __init__(self, code: ErrorCode, detail: str, *, ref: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref


# --- client -> server ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: int | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class Post:
    room: str
    body: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    room: str


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    room: str
    before: int | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    n: int | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    n: int | None = None


ClientFrame = Join | Leave | Post | Typing | HistoryRequest | Ping | Pong


def type_name(frame: ClientFrame) -> str:
    """The wire `type` a parsed client frame came with."""
    return _TYPE_NAMES[type(frame)]


def decode(data: str | bytes, fmt: WireFormat) -> Any:
    """Decode one WebSocket message into a Python value, or raise ProtocolError."""
    try:
        if fmt is WireFormat.MSGPACK:
            if not isinstance(data, bytes):
                raise ProtocolError(ErrorCode.BAD_FRAME, "msgpack sockets take binary frames")
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        return orjson.loads(data)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData, msgpack.StackError) as exc:
        # orjson raises JSONDecodeError (a ValueError), including for invalid UTF-8 and for
        # nesting past its limit; msgpack raises ValueError, ExtraData or StackError.
        raise ProtocolError(ErrorCode.BAD_FRAME, f"cannot decode {fmt.value}: {exc}") from None


def parse(data: str | bytes, fmt: WireFormat) -> ClientFrame:
    """Parse one client WebSocket message. Raises ProtocolError for anything malformed."""
    return parse_value(decode(data, fmt))


def parse_value(value: Any) -> ClientFrame:
    """Validate a decoded frame and build its frame class. Unknown extra keys are ignored."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a map with a 'type'")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "missing or non-string 'type'")
    builder = _PARSERS.get(kind)
    if builder is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown frame type {kind[:32]!r}")
    return builder(value)


def _field_error(value: Frame, detail: str) -> ProtocolError:
    ref = value.get("client_id")
    if not (isinstance(ref, str) and 0 < len(ref) <= CLIENT_ID_MAX_LENGTH):
        ref = None
    return ProtocolError(ErrorCode.BAD_FRAME, detail, ref=ref)


def _room(value: Frame) -> str:
    room = value.get("room")
    if not isinstance(room, str) or not 0 < len(room) <= ROOM_MAX_LENGTH:
        raise _field_error(value, f"'room' must be a string of 1-{ROOM_MAX_LENGTH} characters")
    return room


def _optional_int(value: Frame, key: str, *, minimum: int) -> int | None:
    raw = value.get(key)
    if raw is None:
        return None
    # bool is an int in Python but never a valid id or count on the wire.
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum or raw >= 2**63:
        raise _field_error(value, f"'{key}' must be an integer >= {minimum}")
    return raw


def _parse_join(value: Frame) -> Join:
    return Join(room=_room(value), since=_optional_int(value, "since", minimum=0))


def _parse_leave(value: Frame) -> Leave:
    return Leave(room=_room(value))


def _parse_post(value: Frame) -> Post:
    room = _room(value)
    body = value.get("body")
    if not isinstance(body, str):
        raise _field_error(value, "'body' must be a string")
    client_id = value.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str) or not 0 < len(client_id) <= CLIENT_ID_MAX_LENGTH
    ):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"'client_id' must be a string of 1-{CLIENT_ID_MAX_LENGTH} characters",
        )
    return Post(room=room, body=body, client_id=client_id)


def _parse_typing(value: Frame) -> Typing:
    return Typing(room=_room(value))


def _parse_history(value: Frame) -> HistoryRequest:
    return HistoryRequest(
        room=_room(value),
        before=_optional_int(value, "before", minimum=1),
        limit=_optional_int(value, "limit", minimum=1),
    )


def _parse_ping(value: Frame) -> Ping:
    return Ping(n=_optional_int(value, "n", minimum=0))


def _parse_pong(value: Frame) -> Pong:
    return Pong(n=_optional_int(value, "n", minimum=0))


_PARSERS: Final[dict[str, Callable[[Frame], ClientFrame]]] = {
    "join": _parse_join,
    "leave": _parse_leave,
    "message": _parse_post,
    "typing": _parse_typing,
    "history": _parse_history,
    "ping": _parse_ping,
    "pong": _parse_pong,
}


_TYPE_NAMES: Final[dict[type, str]] = {
    Join: "join",
    Leave: "leave",
    Post: "message",
    Typing: "typing",
    HistoryRequest: "history",
    Ping: "ping",
    Pong: "pong",
}


# --- server -> client ------------------------------------------------------------------------


def hello(
    *,
    user: str | None,
    moderator: bool,
    connection: str,
    heartbeat_s: float,
    max_body: int,
    max_frame: int,
) -> Frame:
    return {
        "type": "hello",
        "version": VERSION,
        "user": user,
        "moderator": moderator,
        "connection": connection,
        "heartbeat_ms": round(heartbeat_s * 1000),
        "limits": {"body": max_body, "frame": max_frame},
    }


def message(
    *, room: str, id: int, user: str, body: str, ts: int, client_id: str | None = None
) -> Frame:
    frame: Frame = {"type": "message", "room": room, "id": id, "user": user, "body": body, "ts": ts}
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


def joined(
    *,
    room: str,
    title: str,
    history: list[Frame],
    online: int,
    more: bool,
    gap: bool,
    slow_mode: int,
    read_only: bool,
    deleted: list[int] | None = None,
) -> Frame:
    """`more`: older messages exist (page back with `history`). `gap`: `since` was older than
    the recovery limit reaches back, so messages between it and `history` were skipped.
    `deleted`: with `since`, ids up to it that were deleted while the client was away."""
    return {
        "type": "joined",
        "room": room,
        "title": title,
        "history": history,
        "online": online,
        "more": more,
        "gap": gap,
        "slow_mode": slow_mode,
        "read_only": read_only,
        "deleted": deleted or [],
    }


def left(*, room: str) -> Frame:
    return {"type": "left", "room": room}


def ack(*, room: str, client_id: str | None, id: int, ts: int, duplicate: bool = False) -> Frame:
    return {
        "type": "ack",
        "room": room,
        "client_id": client_id,
        "id": id,
        "ts": ts,
        "duplicate": duplicate,
    }


def typing(*, room: str, user: str) -> Frame:
    return {"type": "typing", "room": room, "user": user}


def delete(*, room: str, id: int) -> Frame:
    return {"type": "delete", "room": room, "id": id}


def clear(*, room: str) -> Frame:
    """A moderator cleared the room: clients drop every message they show for it."""
    return {"type": "clear", "room": room}


def room_settings(*, room: str, slow_mode: int, read_only: bool) -> Frame:
    """The room's posting rules changed."""
    return {"type": "room", "room": room, "slow_mode": slow_mode, "read_only": read_only}


def notice(*, room: str | None, detail: str, ref: str | None = None) -> Frame:
    """Information for one socket, e.g. the outcome of a moderator command."""
    frame: Frame = {"type": "notice", "room": room, "detail": detail}
    if ref is not None:
        frame["ref"] = ref
    return frame


def reconnect(*, retry_ms: int) -> Frame:
    """This server is going away: reconnect (to another) after `retry_ms`, with `since`."""
    return {"type": "reconnect", "retry_ms": retry_ms}


def resync(*, room: str, since: int | None) -> Frame:
    """Events of this room may have been missed (a broker outage): re-join with `since`.

    With `since`, the messages after that id may be missing: re-join with `since` no later
    than it. The server applies it to the next join of the room anyway, so a client that
    re-joins with its own last id recovers too; it gets again, and must ignore, messages it
    saw after `since`. Without it, the client's own last id is right."""
    frame: Frame = {"type": "resync", "room": room}
    if since is not None:
        frame["since"] = since
    return frame


def history(*, room: str, messages: list[Frame], more: bool) -> Frame:
    return {"type": "history", "room": room, "messages": messages, "more": more}


def presence(*, room: str, online: int) -> Frame:
    return {"type": "presence", "room": room, "online": online}


def error(code: ErrorCode, detail: str, *, ref: str | None = None, **extra: Any) -> Frame:
    frame: Frame = {"type": "error", "code": code.value, "detail": detail}
    if ref is not None:
        frame["ref"] = ref
    frame.update(extra)
    return frame


def error_from(exc: ProtocolError) -> Frame:
    return error(exc.code, exc.detail, ref=exc.ref)


def ping(n: int) -> Frame:
    return {"type": "ping", "n": n}


def pong(n: int | None = None) -> Frame:
    return {"type": "pong"} if n is None else {"type": "pong", "n": n}


def batch(frames: Iterable[Frame]) -> Frame:
    return {"type": "batch", "messages": list(frames)}


# --- encoding --------------------------------------------------------------------------------


def dumps(frame: Frame, fmt: WireFormat) -> str | bytes:
    """Encode one frame for one socket (the per-socket path: hello, acks, errors)."""
    if fmt is WireFormat.MSGPACK:
        return msgpack.packb(frame)
    return orjson.dumps(frame).decode()


def send_event(frame: Frame, fmt: WireFormat) -> dict[str, Any]:
    """The ASGI `websocket.send` event carrying one frame."""
    data = dumps(frame, fmt)
    if isinstance(data, bytes):
        return {"type": "websocket.send", "bytes": data}
    return {"type": "websocket.send", "text": data}


class Encoded:
    """One frame, encoded at most once per wire format, shared by every socket that gets it.

    `event(fmt)` is the ready ASGI send event and `size(fmt)` its payload length in bytes;
    the fan-out path hands the same event object to every socket.
    """

    __slots__ = ("_events", "_sizes", "frame")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self._events: dict[WireFormat, dict[str, Any]] = {}
        self._sizes: dict[WireFormat, int] = {}

    def event(self, fmt: WireFormat) -> dict[str, Any]:
        event = self._events.get(fmt)
        if event is None:
            if fmt is WireFormat.MSGPACK:
                data = msgpack.packb(self.frame)
                event = {"type": "websocket.send", "bytes": data}
            else:
                data = orjson.dumps(self.frame)
                event = {"type": "websocket.send", "text": data.decode()}
            self._events[fmt] = event
            self._sizes[fmt] = len(data)
        return event

    def size(self, fmt: WireFormat) -> int:
        if fmt not in self._sizes:
            self.event(fmt)
        return self._sizes[fmt]
