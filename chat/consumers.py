"""The chat socket: decode a frame, call one service or selector, answer.

Deliveries to this socket do not pass through here: the hub writes room events straight
to the socket. The consumer owns the socket's lifecycle and the request/answer frames
(hello, joined, ack, history, pong, error). It reads its frames with a plain loop rather
than Channels' dispatch machinery, which would add a task and a thread hop per frame; it
has no channel-layer channel of its own, since the process's hub is the group member.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings

from chat import protocol, selectors, services
from chat.auth import ANONYMOUS, Identity
from chat.batching import Batcher
from chat.errors import ChatError
from chat.hub import Connection, Hub, Send, current_hub, get_hub
from chat.protocol import CloseCode, ErrorCode, ProtocolError
from chat.selectors import RoomInfo
from monitoring import metrics

logger = logging.getLogger(__name__)

TYPING_MIN_INTERVAL = 2.0  # seconds between typing events one socket may send per room


class ChatConsumer(AsyncConsumer):
    hub: Hub
    conn: Connection | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # The scope is not kept: it is a copy per middleware that would live as long as the
        # socket, and all the consumer needs of it is who is connecting and in which format.
        self.subprotocols: list[str] = list(scope.get("subprotocols") or ())
        self.send_event: Send = send
        self.identity = self._identity(scope)
        del scope
        self.rooms: dict[str, RoomInfo] = {}
        self.typing_at: dict[int, float] = {}
        self.moderator = False
        self.window_start = 0.0
        self.window_frames = 0
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            if self.conn is not None:
                await self.hub.unregister(self.conn)
                self.conn = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.receive":
            await self.websocket_receive(message)
        elif kind == "websocket.connect":
            await self.websocket_connect(message)
        elif kind == "websocket.disconnect":
            # A close the server chose is counted by its own code: a peer that was dropped
            # for silence or slowness never echoes it, and the server only sees 1006.
            chosen = self.conn.close_code if self.conn is not None else None
            metrics.DISCONNECTS.labels(str(chosen or message.get("code", 1005))).inc()
            raise StopConsumer

    @staticmethod
    def _identity(scope: dict[str, Any]) -> Identity:
        identity = scope.get("chat_identity")
        if isinstance(identity, Identity):
            return identity
        user = scope.get("user")
        if user is not None and user.is_authenticated:
            return Identity(user_id=user.pk, username=user.get_username())
        return ANONYMOUS

    # --- lifecycle ---------------------------------------------------------------------------

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        fmt, subprotocol = protocol.select_subprotocol(self.subprotocols)
        hub = current_hub()
        if hub is not None and hub.draining:
            # Refused before the handshake completes (HTTP 403), so a load balancer can pass
            # the attempt on to another process at once (nginx: proxy_next_upstream http_403).
            metrics.REJECTED.labels("draining").inc()
            await self.send_event({"type": "websocket.close", "code": int(CloseCode.NORMAL)})
            return
        await self.send_event({"type": "websocket.accept", "subprotocol": subprotocol})
        _release_handshake(self.send_event)
        try:
            self.hub = await get_hub()
        except Exception:
            logger.warning("chat: hub unavailable at connect", exc_info=True)
            await self.send_event(
                protocol.send_event(
                    protocol.error(ErrorCode.UNAVAILABLE, "chat is unavailable; retry shortly"),
                    fmt,
                )
            )
            await self.send_event({"type": "websocket.close", "code": int(CloseCode.TRY_AGAIN)})
            return
        if self.identity.user_id is not None:
            profile = await _profiles.submit(self.identity.user_id)
            refusal: tuple[protocol.Frame, CloseCode] | None = None
            if not profile.active:
                refusal = (
                    protocol.error(ErrorCode.AUTH_REQUIRED, "this account is disabled"),
                    CloseCode.UNAUTHORIZED,
                )
            elif profile.banned is not None:
                banned = services.banned_error(profile.banned)
                refusal = (
                    protocol.error(banned.code, banned.detail, **banned.extra),
                    CloseCode.BANNED,
                )
            if refusal is not None:
                await self.send_event(protocol.send_event(refusal[0], fmt))
                await self.send_event({"type": "websocket.close", "code": int(refusal[1])})
                return
            self.moderator = profile.moderator
        self.conn = conn = Connection(
            self.send_event,
            fmt=fmt,
            user_id=self.identity.user_id,
            username=self.identity.username,
        )
        self.hub.register(conn)
        metrics.CONNECTS.inc()
        conn.send_frame(
            protocol.hello(
                user=self.identity.username,
                moderator=self.moderator,
                connection=conn.id,
                heartbeat_s=settings.CHAT_HEARTBEAT_INTERVAL,
                max_body=settings.CHAT_MAX_MESSAGE_LENGTH,
                max_frame=settings.CHAT_MAX_FRAME_BYTES,
            )
        )

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
            size = len(data)
        else:
            size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if size > settings.CHAT_MAX_FRAME_BYTES:
            metrics.DROPPED.labels("frame_too_big").inc()
            conn.close(CloseCode.FRAME_TOO_BIG)
            return
        self.hub.touch(conn)
        if self._flooding(conn.last_activity):
            metrics.DROPPED.labels("flood").inc()
            conn.close(CloseCode.FLOOD)
            return
        try:
            frame = protocol.parse(data, conn.fmt)
        except ProtocolError as exc:
            self._error(exc.code, exc.detail, ref=exc.ref)
            return
        metrics.FRAMES_IN.labels(protocol.type_name(frame)).inc()
        try:
            await self._handle(conn, frame)
        except ChatError as exc:
            self._error(exc.code, exc.detail, ref=_ref(frame), **exc.extra)
        except Exception:
            logger.exception("chat: failed to handle %s", type(frame).__name__)
            self._error(
                ErrorCode.INTERNAL, "the server failed to handle this frame", ref=_ref(frame)
            )

    # --- frames ------------------------------------------------------------------------------

    async def _handle(self, conn: Connection, frame: protocol.ClientFrame) -> None:
        match frame:
            case protocol.Post():
                await self._post(conn, frame)
            case protocol.Pong(n=n):
                conn.pong(n)
            case protocol.Typing():
                await self._typing(frame)
            case protocol.Join():
                await self._join(conn, frame)
            case protocol.Leave():
                await self._leave(conn, frame)
            case protocol.HistoryRequest():
                await self._history(conn, frame)
            case protocol.Ping(n=n):
                conn.send_frame(protocol.pong(n))

    async def _join(self, conn: Connection, frame: protocol.Join) -> None:
        if frame.room not in self.rooms and len(self.rooms) >= settings.CHAT_MAX_ROOMS_PER_SOCKET:
            limit = settings.CHAT_MAX_ROOMS_PER_SOCKET
            raise ChatError(
                ErrorCode.TOO_MANY_ROOMS, f"a socket can join at most {limit} rooms", limit=limit
            )
        room = await _room_entries.submit((frame.room, self.identity.user_id))
        try:
            await self.hub.join(
                conn, room.id, room.slug, slow_mode=room.slow_mode, read_only=room.read_only
            )
        except Exception:
            raise ChatError(ErrorCode.UNAVAILABLE, "cannot join right now; retry shortly") from None
        since = self.hub.join_since(conn, room.id, frame.since)
        try:
            # Read after the hub holds the room's events for this socket: nothing posted in
            # between is missed, and join_complete drops what the history already has.
            found = await _histories.submit((room, since))
        except BaseException:
            if room.slug not in self.rooms:
                await self.hub.leave(conn, room.id)
            raise
        self.rooms[room.slug] = room
        online = await self.hub.presence.count(room.id)
        slow_mode, read_only = self.hub.rules(room.id)
        conn.send_frame(
            protocol.joined(
                room=room.slug,
                title=room.title,
                history=found.messages,
                online=online,
                more=found.more,
                gap=found.gap,
                slow_mode=slow_mode,
                read_only=read_only,
                deleted=found.deleted,
            )
        )
        newest = found.messages[-1]["id"] if found.messages else None
        self.hub.join_complete(
            conn, room.id, newest if newest is not None else (since or 0), history_last=newest
        )

    async def _leave(self, conn: Connection, frame: protocol.Leave) -> None:
        room = self._joined(frame.room)
        del self.rooms[room.slug]
        self.typing_at.pop(room.id, None)
        await self.hub.leave(conn, room.id)
        conn.send_frame(protocol.left(room=room.slug))

    async def _post(self, conn: Connection, frame: protocol.Post) -> None:
        if self.identity.user_id is None:
            raise ChatError(ErrorCode.AUTH_REQUIRED, "sign in to post")
        room = self._joined(frame.room)
        slow_mode, _ = self.hub.rules(room.id)
        result = await services.message_submit(
            user_id=self.identity.user_id,
            moderator=self.moderator,
            room=room,
            body=frame.body,
            client_id=frame.client_id,
            slow_mode=slow_mode,
        )
        if not isinstance(result, services.PostResult):
            conn.send_frame(result)  # a moderator command's outcome
            return
        posted = result.frame
        conn.send_frame(
            protocol.ack(
                room=room.slug,
                client_id=frame.client_id,
                id=posted["id"],
                ts=posted["ts"],
                duplicate=result.duplicate,
            )
        )
        if not result.duplicate:
            metrics.MESSAGES_POSTED.inc()

    async def _typing(self, frame: protocol.Typing) -> None:
        if self.identity.username is None:
            raise ChatError(ErrorCode.AUTH_REQUIRED, "sign in to chat")
        room = self._joined(frame.room)
        now = time.monotonic()
        if now - self.typing_at.get(room.id, 0.0) < TYPING_MIN_INTERVAL:
            return  # one typing event per interval is all the others need to see
        self.typing_at[room.id] = now
        try:
            await services.typing_publish(room=room, username=self.identity.username)
        except Exception:
            metrics.DROPPED.labels("typing_unpublished").inc()

    async def _history(self, conn: Connection, frame: protocol.HistoryRequest) -> None:
        room = self._joined(frame.room)
        limit = min(frame.limit or settings.CHAT_HISTORY_LIMIT, settings.CHAT_HISTORY_PAGE_MAX)
        page = await database_sync_to_async(selectors.message_page)(
            room=room, before=frame.before, limit=limit
        )
        conn.send_frame(protocol.history(room=room.slug, messages=page.messages, more=page.more))

    # --- helpers -----------------------------------------------------------------------------

    def _joined(self, slug: str) -> RoomInfo:
        room = self.rooms.get(slug)
        if room is not None and self.conn is not None and room.id not in self.conn.rooms:
            # The hub took this socket out of the room (a room ban).
            del self.rooms[slug]
            room = None
        if room is None:
            raise ChatError(ErrorCode.NOT_JOINED, f"join {slug!r} first")
        return room

    def _flooding(self, now: float) -> bool:
        """More than CHAT_SOCKET_FRAMES_PER_10S frames in the current 10 s window."""
        if now - self.window_start >= 10.0:
            self.window_start, self.window_frames = now, 0
        self.window_frames += 1
        return self.window_frames > settings.CHAT_SOCKET_FRAMES_PER_10S

    def _error(self, code: ErrorCode, detail: str, *, ref: str | None, **extra: Any) -> None:
        metrics.ERRORS_SENT.labels(code.value).inc()
        if self.conn is not None:
            self.conn.send_frame(protocol.error(code, detail, ref=ref, **extra))


def _release_handshake(send: Any) -> None:
    """Let go of the handshake that Uvicorn's websockets-sansio protocol keeps for a socket's
    whole life: the parsed request and the 101 response, ~4.5 KB of headers per socket that
    nothing reads once the handshake is complete (the scope has its own copy of the request
    headers). The request's headers are emptied rather than dropped because the websockets
    parser, a generator that lives as long as the socket, holds the request too.

    This reaches into the server's protocol object, so it acts only on the protocol class and
    state it was written against (tests/test_servers.py checks that it still applies to the
    Uvicorn in requirements.txt); with any other server it does nothing.
    """
    server: Any = getattr(send, "__self__", None)
    if type(server).__name__ != "WebSocketsSansIOProtocol":
        return
    if getattr(server, "handshake_complete", None) is not True:
        return
    request, response = getattr(server, "request", None), getattr(server, "response", None)
    if request is None or response is None:
        return
    headers: Any = getattr(request, "headers", None)
    if hasattr(headers, "clear"):
        headers.clear()
    server.request = server.response = None
    metrics.HANDSHAKES_RELEASED.inc()


def _socket_profiles(user_ids: list[int]) -> list[selectors.SocketProfile]:
    profiles = selectors.user_socket_profiles(user_ids=user_ids)
    return [profiles[user_id] for user_id in user_ids]


# A storm of connects and joins costs the database thread a few queries per batch, not per
# socket (chat.batching).
_profiles = Batcher("profile", _socket_profiles)
_room_entries = Batcher("join", services.room_enter_many)
_histories = Batcher("history", selectors.join_histories)


def _ref(frame: protocol.ClientFrame) -> str | None:
    """What an error refers to: the message's client_id, else the room."""
    client_id = getattr(frame, "client_id", None)
    if client_id is not None:
        return str(client_id)
    room = getattr(frame, "room", None)
    return str(room) if room is not None else None
