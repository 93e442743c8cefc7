"""The per-process fan-out hub: local sockets per room, one channel-layer channel per process.

How a room event travels (docs/protocol.md, "Delivery"):

    services -> publish(room_id, frame) -> one group_send to the room's group
    -> every process with local members receives it once on its hub channel
    -> the hub encodes it once per wire format (alone, or in a batch with the other
       events of the same window) and writes the same bytes to every local member.

Group members are processes, not sockets: the hub joins a room's group when its first
local socket joins and leaves when the last one goes. Nothing here touches the ORM, and
nothing on the delivery path creates a task, hops threads or encodes per socket.

Outbound memory is bounded per socket by counting the bytes written that the client has
not yet confirmed: every CHAT_FLOW_PING_BYTES the hub sends a `ping` carrying a nonce,
and a `pong` echoing it confirms everything written before that ping. Daphne gives the
application no backpressure at all, so this is the only way to see a socket that stopped
reading; under Uvicorn a blocked send is also parked (see Connection.write). Past
CHAT_OUTBOUND_SHED_BYTES typing events are skipped; past CHAT_OUTBOUND_LIMIT_BYTES the
socket is closed with 4008 and the client reconnects with `since`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import random
import signal
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings

from chat import protocol, redis_clients
from chat.presence import Presence
from chat.protocol import CloseCode, Encoded, Frame, WireFormat
from monitoring import metrics

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]

EVENT_TYPE = "chat.room"
CONTROL_TYPE = "chat.control"
PROBE_TYPE = "chat.probe"
CONTROL_GROUP = "chat.control"


# A room's batching window is at least this many times as long as its last flush took, so
# writing one room's events costs at most about 1/WINDOW_STRETCH of the loop.
WINDOW_STRETCH = 2.0


def room_group(room_id: int) -> str:
    return f"room.{room_id}"


class Connection:
    """One socket as the hub sees it: who it is, where it is, and what it owes us.

    Holds the seed's connection metadata (user, rooms, connected_at, last_activity) and
    the outbound accounting; no message history.
    """

    __slots__ = (
        "__weakref__",
        "_send",
        "acked_bytes",
        "backlog",
        "close_code",
        "closed",
        "connected_at",
        "fmt",
        "id",
        "joining",
        "last_activity",
        "last_pong",
        "next_flow_ping",
        "pings",
        "resync_floor",
        "rooms",
        "sent_bytes",
        "user_id",
        "username",
        "writer",
    )

    def __init__(
        self, send: Send, *, fmt: WireFormat, user_id: int | None, username: str | None
    ) -> None:
        now = time.monotonic()
        self.id = uuid.uuid4().hex[:16]
        self._send = send
        self.fmt = fmt
        self.user_id = user_id
        self.username = username
        self.rooms: set[int] = set()
        # room id -> the `since` of the last `resync` sent for it: the next join of that room
        # recovers from there at least, whatever `since` the client sends.
        self.resync_floor: dict[int, int] = {}
        # Rooms whose `joined` is still being prepared: events are held here until then, so
        # a joining socket gets nothing before its history and nothing twice.
        self.joining: dict[int, list[Frame]] = {}
        self.connected_at = time.time()
        self.last_activity = now
        self.last_pong = now
        self.sent_bytes = 0
        self.acked_bytes = 0
        self.next_flow_ping = settings.CHAT_FLOW_PING_BYTES
        # Created on first use: most sockets never need them, and an empty deque costs ~760
        # bytes (it allocates its first block with it).
        self.pings: list[tuple[int, int]] | None = None  # (nonce, sent_bytes), oldest first
        self.backlog: collections.deque[dict[str, Any]] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closed = False
        # The code the server closed this socket with, if it did (the peer may never answer).
        self.close_code: int | None = None

    @property
    def outstanding(self) -> int:
        """Bytes written to this socket that the client has not confirmed reading."""
        return self.sent_bytes - self.acked_bytes

    def write(self, event: dict[str, Any], size: int) -> bool:
        """Write one ASGI send event without waiting; False if the socket is gone.

        The ASGI send coroutine is driven by hand: under Daphne, and under Uvicorn while the
        transport is writable, it finishes in its first step, so a delivery costs no task and
        no scheduling. Only when the server parks the send (Uvicorn's flow control) is the rest
        of it, and anything queued behind it, finished in a writer task.
        """
        if self.closed:
            return False
        self.sent_bytes += size
        if self.writer is not None:
            if self.backlog is None:
                self.backlog = collections.deque()
            self.backlog.append(event)
            return True
        coro = self._send(event)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return True
        except Exception:
            # The server already knows this socket is gone (Uvicorn raises on a closed
            # socket); the consumer's disconnect handler cleans up.
            self.closed = True
            return False
        self.writer = asyncio.get_running_loop().create_task(self._finish(coro, yielded))
        return True

    async def _finish(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        """Resume a send the server parked, then flush the backlog in order."""
        try:
            await _resume(coro, yielded)
            while self.backlog and not self.closed:
                await self._send(self.backlog.popleft())
            self.backlog = None
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception:
            self.closed = True
        finally:
            self.writer = None

    def send_frame(self, frame: Frame) -> bool:
        """Encode and write one frame meant for this socket alone."""
        data = protocol.dumps(frame, self.fmt)
        event: dict[str, Any]
        if isinstance(data, bytes):
            event = {"type": "websocket.send", "bytes": data}
        else:
            event = {"type": "websocket.send", "text": data}
        return self.write(event, len(data))

    def ping(self) -> None:
        """Send an application ping whose pong confirms everything written before it."""
        nonce = random.getrandbits(31)
        if self.pings is None:
            self.pings = []
        self.pings.append((nonce, self.sent_bytes))
        self.next_flow_ping = self.sent_bytes + settings.CHAT_FLOW_PING_BYTES
        self.send_frame(protocol.ping(nonce))

    def pong(self, nonce: int | None) -> None:
        """Credit the client for a pong. Pongs are answered in order; unknown ones are ignored."""
        if nonce is None or not self.pings:
            return
        for index, (sent_nonce, mark) in enumerate(self.pings):
            if sent_nonce == nonce:
                del self.pings[: index + 1]
                self.acked_bytes = max(self.acked_bytes, mark)
                self.last_pong = time.monotonic()
                return

    def close(self, code: CloseCode) -> None:
        """Stop writing to this socket and ask the server to close it with `code`."""
        if self.closed:
            return
        self.closed = True
        self.close_code = int(code)
        self.backlog = None
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        coro = self._send({"type": "websocket.close", "code": int(code)})
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        except Exception:
            return
        # Uvicorn parks the close too when the peer is not reading; let it finish on its own.
        asyncio.get_running_loop().create_task(_resume_quietly(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Finish a coroutine that was started by hand and parked at `yielded`.

    Does what a Task would: wait for the future it yielded (or give the loop a turn for a
    bare yield), then step it again, until it returns. A failed future raises inside the
    coroutine when it is resumed, as it would under a Task.
    """
    while True:
        if yielded is None:
            await asyncio.sleep(0)
        else:
            with contextlib.suppress(Exception):
                await yielded
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


async def _resume_quietly(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    with contextlib.suppress(Exception):
        await _resume(coro, yielded)


class LocalRoom:
    """A room with local members: who they are, and the batching state of its events."""

    __slots__ = (
        "checkpoint",
        "flush_handle",
        "id",
        "last_id",
        "members",
        "next_checkpoint",
        "pending",
        "pending_since",
        "quiet_at",
        "read_only",
        "slow_mode",
        "slug",
        "window",
    )

    def __init__(
        self, room_id: int, slug: str, *, slow_mode: int, read_only: bool, window: float
    ) -> None:
        self.id = room_id
        self.slug = slug
        # The room's posting rules as last announced; `room` events keep them current.
        self.slow_mode = slow_mode
        self.read_only = read_only
        self.members: set[Connection] = set()
        # The highest message id this process has delivered in the room (live or as history),
        # and the recovery point a `resync` names: last_id as it was one healthy probe ago, so
        # a message committed before it but published a little later is still recovered.
        self.last_id = 0
        self.next_checkpoint = 0
        self.checkpoint = 0
        self.pending: list[Frame] = []
        self.pending_since = 0.0
        # The batching window is open until this monotonic time; an event arriving after it
        # goes out at once. Its length stretches with what a flush to this room costs here
        # (Hub._deliver), so that one huge room cannot take the whole loop.
        self.quiet_at = 0.0
        self.window = window
        self.flush_handle: asyncio.TimerHandle | None = None


class Hub:
    """One per process and event loop; see the module docstring."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel: str | None = None
        self.connections: set[Connection] = set()
        self.rooms: dict[int, LocalRoom] = {}
        self.window = settings.CHAT_BATCH_WINDOW_MS / 1000
        self.max_window = max(self.window, settings.CHAT_BATCH_WINDOW_MAX_MS / 1000)
        self.presence = Presence(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._kicks: set[asyncio.Task[None]] = set()
        self.probe_back = time.monotonic()
        # Probes carry a sequence number; one missing from the sequence (its publish failed,
        # or the subscription was down when it passed) means room events may be missing too.
        self.probe_sent = 0
        self.probe_received = 0
        # room id -> the id before the first message this process stored but failed to
        # publish; every process is told to resync those rooms once the layer works again.
        self.unpublished: dict[int, int] = {}
        self.draining = False
        self._probe_waiters: dict[str, asyncio.Future[None]] = {}
        self._started = asyncio.Event()
        self._starting = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started.is_set():
            return
        if self._starting:
            await self._started.wait()
            return
        self._starting = True
        loop = asyncio.get_running_loop()
        try:
            self.channel = await _layer_call("new_channel", self.layer.new_channel())
            await _layer_call("group_add", self.layer.group_add(CONTROL_GROUP, self.channel))
        except BaseException:
            self._starting = False
            raise
        metrics.REDIS_UP.set(1)
        self._tasks.append(loop.create_task(self._receive_loop(), name="chat-hub-receive"))
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name="chat-hub-heartbeat"))
        self._tasks.append(loop.create_task(self.presence.run(), name="chat-hub-presence"))
        self._tasks.append(loop.create_task(self._probe_loop(), name="chat-hub-probe"))
        if settings.CHAT_DRAIN_ON_SIGTERM:
            self._install_drain()
        metrics.MEMORY_PER_SOCKET.set_function(
            lambda: metrics.process_rss_bytes() / max(1, len(self.connections))
        )
        metrics.watch_gc()
        if settings.CHAT_GC_FREEZE and not gc.get_freeze_count():
            # Everything loaded so far (Django, the app, the server) lives as long as the
            # process: moved out of the collector's sight, it no longer makes every full
            # collection, a pause of the whole loop, longer (docs/benchmarks.md).
            gc.collect()
            gc.freeze()
        self._started.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await redis_clients.close_async()

    # --- sockets -----------------------------------------------------------------------------

    def register(self, conn: Connection) -> None:
        self.connections.add(conn)
        metrics.SOCKETS_OPEN.set(len(self.connections))

    async def unregister(self, conn: Connection) -> None:
        conn.closed = True
        if conn.writer is not None:
            conn.writer.cancel()
            conn.writer = None
        for room_id in list(conn.rooms | conn.joining.keys()):
            await self.leave(conn, room_id)
        self.connections.discard(conn)
        metrics.SOCKETS_OPEN.set(len(self.connections))

    async def join(
        self,
        conn: Connection,
        room_id: int,
        slug: str,
        *,
        slow_mode: int = 0,
        read_only: bool = False,
    ) -> None:
        """Start a join: subscribe the process if needed and hold the room's events for conn.

        Call `join_complete` once `joined` is sent. Subscribing happens before the caller reads
        history, so nothing posted in between can be missed. The rules passed in were just
        read from the database: they replace the local copy, which a `room` event lost in an
        outage could have left stale.
        """
        room = self.rooms.get(room_id)
        if room is not None:
            room.slow_mode, room.read_only = slow_mode, read_only
        else:
            room = self.rooms[room_id] = LocalRoom(
                room_id, slug, slow_mode=slow_mode, read_only=read_only, window=self.window
            )
            metrics.ROOMS_LOCAL.set(len(self.rooms))
            if self.channel is not None:
                try:
                    await _layer_call(
                        "group_add", self.layer.group_add(room_group(room_id), self.channel)
                    )
                except Exception:
                    if not room.members and not self._joining_any(room_id):
                        self.rooms.pop(room_id, None)
                    raise
        conn.joining[room_id] = []
        if conn in room.members:
            return  # a re-join (resync): hold events again, membership stays
        room.members.add(conn)
        conn.rooms.add(room_id)
        self.presence.joined(room, conn)

    def join_complete(
        self, conn: Connection, room_id: int, last_id: int, *, history_last: int | None = None
    ) -> None:
        """Release the events held during the join, minus what `joined.history` already had.

        `history_last` is the id of the newest message in `joined.history`, if any: a room's
        recovery point starts there (never from a client's `since`, which may be anything)."""
        held = conn.joining.pop(room_id, None)
        if not conn.joining:
            conn.joining = {}  # an emptied dict keeps its grown table; a new one has none
        room = self.rooms.get(room_id)
        if room is not None and history_last is not None and history_last > room.last_id:
            room.last_id = history_last
            if not room.checkpoint:
                room.checkpoint = room.next_checkpoint = history_last
        if not held or conn.closed:
            return
        fresh = [f for f in held if not (f.get("type") == "message" and f["id"] <= last_id)]
        if fresh:
            conn.send_frame(fresh[0] if len(fresh) == 1 else protocol.batch(fresh))

    async def leave(self, conn: Connection, room_id: int) -> None:
        conn.joining.pop(room_id, None)
        conn.resync_floor.pop(room_id, None)
        conn.rooms.discard(room_id)
        room = self.rooms.get(room_id)
        if room is not None and self._remove_member(room, conn):
            await self._unsubscribe(room_id)

    def _remove_member(self, room: LocalRoom, conn: Connection) -> bool:
        """Take a socket out of a room's members and its presence; True if that emptied the
        room, which is then forgotten here (the caller unsubscribes the process)."""
        if conn not in room.members:
            return False
        room.members.discard(conn)
        self.presence.left(room, conn)
        if room.members:
            return False
        del self.rooms[room.id]
        metrics.ROOMS_LOCAL.set(len(self.rooms))
        if room.flush_handle is not None:
            room.flush_handle.cancel()
        return True

    async def _unsubscribe(self, room_id: int) -> None:
        if self.channel is None or room_id in self.rooms:
            return  # re-joined meanwhile: the process needs the subscription again
        with contextlib.suppress(Exception):
            await _layer_call(
                "group_discard", self.layer.group_discard(room_group(room_id), self.channel)
            )

    def _joining_any(self, room_id: int) -> bool:
        return any(room_id in conn.joining for conn in self.connections)

    def rules(self, room_id: int) -> tuple[int, bool]:
        """(slow mode seconds, read-only) as last announced for a local room."""
        room = self.rooms.get(room_id)
        return (room.slow_mode, room.read_only) if room is not None else (0, False)

    def touch(self, conn: Connection) -> None:
        conn.last_activity = time.monotonic()

    async def _receive_loop(self) -> None:
        assert self.channel is not None
        while True:
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.LAYER_ERRORS.labels("receive").inc()
                logger.exception("hub: channel layer receive failed; retrying")
                await asyncio.sleep(0.5)
                continue
            try:
                kind = event.get("type")
                if kind == EVENT_TYPE:
                    self._on_room_event(event)
                elif kind == CONTROL_TYPE:
                    self._on_control(event)
                elif kind == PROBE_TYPE:
                    self._on_probe(event)
            except Exception:
                logger.exception("hub: failed to handle %r", event.get("type"))

    # --- fan-out -----------------------------------------------------------------------------

    def _on_room_event(self, event: dict[str, Any]) -> None:
        room = self.rooms.get(event["room"])
        if room is None:
            return
        frame = event["frame"]
        if frame["type"] == "room":
            room.slow_mode, room.read_only = frame["slow_mode"], frame["read_only"]
        now = time.monotonic()
        if self.window <= 0:
            self._deliver(room, [frame], event["at"])
            return
        if room.pending:
            room.pending.append(frame)
            return
        if now >= room.quiet_at:
            # A quiet room pays no batching delay: the first event goes out at once and opens
            # a window that collects whatever follows it.
            self._deliver(room, [frame], event["at"])
            room.quiet_at = time.monotonic() + room.window
            return
        room.pending.append(frame)
        room.pending_since = event["at"]
        room.flush_handle = asyncio.get_running_loop().call_at(room.quiet_at, self._flush, room)

    def _flush(self, room: LocalRoom) -> None:
        room.flush_handle = None
        if not room.pending or self.rooms.get(room.id) is not room:
            room.pending = []
            return
        frames, room.pending = room.pending, []
        self._deliver(room, frames, room.pending_since)
        room.quiet_at = time.monotonic() + room.window

    def _deliver(self, room: LocalRoom, frames: list[Frame], accepted_at: float) -> None:
        """Write one flush of room events to every local member. The hot loop.

        Its own duration sets the room's next batching window: at least CHAT_BATCH_WINDOW_MS,
        and WINDOW_STRETCH times what this flush took, up to CHAT_BATCH_WINDOW_MAX_MS. A room
        whose flushes are cheap keeps the configured window; one with thousands of members
        here gets fewer, larger frames per socket instead of a loop that does nothing else.
        """
        started = time.perf_counter()
        encoded = Encoded(frames[0] if len(frames) == 1 else protocol.batch(frames))
        for frame in frames:
            if frame["type"] == "message" and frame["id"] > room.last_id:
                if not room.checkpoint:  # the first message here since the room was empty
                    room.checkpoint = room.next_checkpoint = frame["id"] - 1
                room.last_id = frame["id"]
        typers = {f["user"] for f in frames if f["type"] == "typing"}
        droppable = all(f["type"] == "typing" for f in frames)  # nothing but typing: sheddable
        shed_at = settings.CHAT_OUTBOUND_SHED_BYTES
        limit = settings.CHAT_OUTBOUND_LIMIT_BYTES
        variants: dict[str, Encoded | None] = {}
        written = shed = 0
        for conn in tuple(room.members):
            if conn.joining and room.id in conn.joining:
                conn.joining[room.id].extend(frames)
                continue
            shared = encoded
            name = conn.username
            if typers and name is not None and name in typers:
                # Typing goes to the others: the typer gets the flush without their own.
                if name not in variants:
                    variants[name] = _without_typing(frames, name)
                variant = variants[name]
                if variant is None:
                    continue
                shared = variant
            if droppable and conn.sent_bytes - conn.acked_bytes > shed_at:
                shed += 1
                continue
            fmt = conn.fmt
            if not conn.write(shared.event(fmt), shared.size(fmt)):
                continue
            written += 1
            if conn.sent_bytes - conn.acked_bytes > limit:
                metrics.DROPPED.labels("slow_consumer").inc()
                self._drop(conn, CloseCode.SLOW_CONSUMER)
            elif conn.sent_bytes >= conn.next_flow_ping:
                conn.ping()
        if written:
            metrics.DELIVERIES.inc(written * len(frames))
            metrics.FRAMES_OUT.labels("batch" if len(frames) > 1 else frames[0]["type"]).inc(
                written
            )
            metrics.BATCH_SIZE.observe(len(frames))
            metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - accepted_at))
        if shed:
            metrics.DROPPED.labels("typing_shed").inc(shed)
        if self.window > 0:
            stretched = WINDOW_STRETCH * (time.perf_counter() - started)
            room.window = min(self.max_window, max(self.window, stretched))

    def deliver_local(self, room_id: int, frame: Frame) -> None:
        """Write a frame to this process's members of a room now (presence updates)."""
        room = self.rooms.get(room_id)
        if room is not None:
            self._deliver(room, [frame], time.time())

    # --- control -----------------------------------------------------------------------------

    def _on_control(self, event: dict[str, Any]) -> None:
        action = event.get("action")
        user_id = event.get("user_id")
        if action == "close_user":
            # Banned everywhere: say why, then close every socket of theirs here.
            code = CloseCode(event["code"])
            for conn in tuple(self.connections):
                if conn.user_id == user_id and not conn.closed:
                    conn.send_frame(event["frame"])
                    self._drop(conn, code)
        elif action == "resync":
            # Some process stored messages it could not publish: members recover them.
            for room_id, since in event["rooms"].items():
                self.resync_room(int(room_id), since=since)
        elif action == "kick":
            # Banned from one room: say why, take them out of it, keep the socket.
            room = self.rooms.get(event["room_id"])
            if room is None:
                return
            for conn in tuple(room.members):
                if conn.user_id == user_id:
                    conn.send_frame(event["frame"])
                    conn.send_frame(protocol.left(room=room.slug))
                    self._background(self.leave(conn, room.id))

    def _drop(self, conn: Connection, code: CloseCode) -> None:
        """Close a socket now, stop delivering to it and stop counting it as present; the
        consumer unregisters it once the server reports the disconnect, which for a peer that
        never reads can take the server's own closing timeout."""
        conn.close(code)
        for room_id in list(conn.rooms):
            room = self.rooms.get(room_id)
            if room is not None and self._remove_member(room, conn):
                self._background(self._unsubscribe(room_id))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine the caller cannot await, keeping a reference until it is done."""
        self._kicks = {task for task in self._kicks if not task.done()}
        self._kicks.add(asyncio.get_running_loop().create_task(coro))

    # --- layer health ------------------------------------------------------------------------
    #
    # Every CHAT_PROBE_INTERVAL the hub sends a probe through the layer to its own channel.
    # Its round trip is the pub/sub lag metric; its absence means Redis is down or hung. While
    # it is down, posts fail fast instead of waiting out a timeout each.
    #
    # Redis pub/sub forgets what it could not deliver, so the probes are numbered: when one
    # arrives after an earlier one did not (its publish failed, or this process's subscription
    # was down while it passed; after a restart redis-py resubscribes a little later than
    # publishers reconnect), room events may have been lost on the way here too, and every
    # local socket is asked to `resync` each room from the room's checkpoint. A socket cannot
    # use its own last id for that: live messages published after the outage may already have
    # reached it, newer than the ones it missed. A process that stored a message but could not
    # publish it tells every process to resync that room once the layer works again, since a
    # short outage may fall between two probes of the others.

    async def _probe_loop(self) -> None:
        assert self.channel is not None
        interval = settings.CHAT_PROBE_INTERVAL
        self.probe_back = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            self.probe_sent += 1
            probe = {"type": PROBE_TYPE, "at": time.time(), "seq": self.probe_sent}
            with contextlib.suppress(Exception):  # a failed send is what the checks see
                await _layer_call("probe", self.layer.send(self.channel, probe))
            silent = time.monotonic() - self.probe_back
            if silent > 2 * interval + settings.CHAT_REDIS_TIMEOUT and not redis_clients.is_down():
                logger.warning("hub: no probe back for %.1f s; treating Redis as down", silent)
                redis_clients.mark_down()

    async def round_trip(self) -> float:
        """Send a probe through the layer and wait for it to come back; returns seconds."""
        token = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        self._probe_waiters[token] = waiter
        started = time.monotonic()
        try:
            assert self.channel is not None
            await _layer_call(
                "probe",
                self.layer.send(
                    self.channel, {"type": PROBE_TYPE, "at": time.time(), "token": token}
                ),
            )
            await waiter
        finally:
            self._probe_waiters.pop(token, None)
        return time.monotonic() - started

    def _on_probe(self, event: dict[str, Any]) -> None:
        waiter = self._probe_waiters.get(event.get("token", ""))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.probe_back = time.monotonic()
        metrics.LAYER_LAG.observe(max(0.0, time.time() - event["at"]))
        seq = event.get("seq")
        if seq is None or seq <= self.probe_received:
            return  # a readiness round trip, or a late probe from before a gap
        missed = seq > self.probe_received + 1 and self.probe_received > 0
        self.probe_received = seq
        if redis_clients.is_down():
            redis_clients.mark_up()
            logger.warning("hub: probes are back; asking local sockets to resync")
            missed = True
        if missed:
            # This probe made it, so the subscription works again; one before it did not, so
            # room events published meanwhile may never have arrived here.
            if not self.draining:
                logger.warning("hub: probe %d arrived but an earlier one did not; resync", seq)
            self.resync_all()
            # Redis may have restarted empty: announce every local member again at once.
            self.presence.next_refresh = 0.0
        else:
            for room in self.rooms.values():
                room.checkpoint, room.next_checkpoint = room.next_checkpoint, room.last_id
        if self.unpublished:
            self._announce_unpublished()

    def _announce_unpublished(self) -> None:
        rooms, self.unpublished = self.unpublished, {}

        async def announce() -> None:
            try:
                await control("resync", rooms={str(k): v for k, v in rooms.items()})
            except Exception:
                for room_id, since in rooms.items():  # try again after the next probe
                    self.unpublished[room_id] = min(since, self.unpublished.get(room_id, since))

        self._background(announce())

    def publish_failed(self, room_id: int, frame: Frame) -> None:
        """A room event could not be published. For a message (stored, never delivered) every
        process is asked to resync the room from before it once the layer works again."""
        if frame.get("type") == "message":
            since = frame["id"] - 1
            self.unpublished[room_id] = min(since, self.unpublished.get(room_id, since))

    def resync_all(self) -> None:
        """Ask every local socket to re-join its rooms from their checkpoints."""
        for room in list(self.rooms.values()):
            self.resync_room(room.id, since=room.checkpoint)
        metrics.RESYNCS.inc()

    def resync_room(self, room_id: int, *, since: int) -> None:
        """Send `resync {room, since}` to the room's local members, spread over
        CHAT_RESYNC_SPREAD so the re-joins do not arrive as one burst. A member's next join of
        the room recovers from `since` at least, even if the client asks for a later one: it
        may already have seen live messages newer than the ones it missed."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        floor: int | None = min(since, room.checkpoint) if room.checkpoint else since
        if not room.last_id:
            # Nothing was delivered here since the members joined: their own last ids are
            # not past anything they missed.
            floor = None
        loop = asyncio.get_running_loop()
        spread = settings.CHAT_RESYNC_SPREAD
        frame = protocol.resync(room=room.slug, since=floor)
        for conn in room.members:
            if floor is not None:
                previous = conn.resync_floor.get(room_id)
                conn.resync_floor[room_id] = floor if previous is None else min(previous, floor)
            loop.call_later(random.uniform(0, spread), conn.send_frame, frame)

    def join_since(self, conn: Connection, room_id: int, since: int | None) -> int | None:
        """The `since` a join recovers from: the client's, lowered to a pending resync's."""
        floor = conn.resync_floor.pop(room_id, None)
        if floor is None or since is None:
            return since
        return min(since, floor)

    # --- graceful drain ------------------------------------------------------------------------
    #
    # SIGTERM: stop taking sockets, close the open ones with 4012 and a `reconnect` hint,
    # spread over CHAT_DRAIN_SPREAD seconds so they land on the other processes gradually,
    # withdraw this process's presence, then hand the signal to the server, which exits.

    def _install_drain(self) -> None:
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(self._begin_drain, previous)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            logger.info("hub: not in the main thread; SIGTERM drain not installed")

    def _begin_drain(self, previous: Any) -> None:
        if self.draining:
            return
        self.draining = True
        logger.warning("hub: SIGTERM, draining %d sockets", len(self.connections))
        task = asyncio.get_running_loop().create_task(self.drain())
        task.add_done_callback(lambda _: _chain_signal(previous))
        self._tasks.append(task)

    async def drain(self) -> None:
        """Close every socket with RESTARTING, spread over the drain window; bounded in time."""
        self.draining = True
        metrics.DRAINING.set(1)
        conns = list(self.connections)
        random.shuffle(conns)
        spread = settings.CHAT_DRAIN_SPREAD
        started = time.monotonic()
        for index, conn in enumerate(conns):
            due = started + spread * index / max(1, len(conns))
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.closed:
                continue
            retry = random.randint(0, settings.CHAT_DRAIN_RETRY_MAX_MS)
            conn.send_frame(protocol.reconnect(retry_ms=retry))
            self._drop(conn, CloseCode.RESTARTING)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(settings.CHAT_REDIS_TIMEOUT):
                await self.presence.withdraw()
        await asyncio.sleep(0.2)  # let the close frames leave before the server stops

    # --- heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = settings.CHAT_HEARTBEAT_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                self.heartbeat()
            except Exception:
                logger.exception("hub: heartbeat pass failed")

    def heartbeat(self) -> None:
        """Close sockets that stopped answering pings; ping the others."""
        now = time.monotonic()
        timeout = settings.CHAT_HEARTBEAT_TIMEOUT
        for conn in tuple(self.connections):
            if conn.closed:
                continue
            if now - conn.last_pong > timeout:
                metrics.DROPPED.labels("heartbeat_timeout").inc()
                self._drop(conn, CloseCode.HEARTBEAT_TIMEOUT)
            else:
                conn.ping()


class LayerDown(Exception):
    """Redis is known to be down: the call was not attempted."""


async def _layer_call(op: str, call: Coroutine[Any, Any, Any]) -> Any:
    """Await a channel-layer call with the Redis timeout: a broken Redis never hangs a caller."""
    try:
        async with asyncio.timeout(settings.CHAT_REDIS_TIMEOUT):
            return await call
    except Exception:
        metrics.LAYER_ERRORS.labels(op).inc()
        raise


async def _layer_call_unless_down(op: str, call: Coroutine[Any, Any, Any]) -> Any:
    """Like _layer_call, but fail at once while the probe says Redis is down."""
    if redis_clients.is_down():
        call.close()
        metrics.LAYER_ERRORS.labels(op).inc()
        raise LayerDown(op)
    return await _layer_call(op, call)


async def publish(room_id: int, frame: Frame) -> None:
    """Send one room event to every member on every process: one group_send.

    Local members get it through the layer too, so every socket of a room, on every
    process, sees the room's events in the same order (the order Redis published them).
    Raises if the layer cannot take it within CHAT_REDIS_TIMEOUT.
    """
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS must configure a default layer"
    event = {"type": EVENT_TYPE, "room": room_id, "frame": frame, "at": time.time()}
    try:
        await _layer_call_unless_down("group_send", layer.group_send(room_group(room_id), event))
    except BaseException:
        hub = current_hub()
        if hub is not None:
            hub.publish_failed(room_id, frame)
        raise


async def control(action: str, **payload: Any) -> None:
    """Send a control event to every process's hub (moderation acting on open sockets)."""
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS must configure a default layer"
    event = {"type": CONTROL_TYPE, "action": action, **payload}
    await _layer_call_unless_down("group_send", layer.group_send(CONTROL_GROUP, event))


def _chain_signal(previous: Any) -> None:
    """Give SIGTERM to whoever had it before the hub (the ASGI server), so it shuts down."""
    if callable(previous):
        previous(signal.SIGTERM, None)
    elif previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _without_typing(frames: list[Frame], username: str) -> Encoded | None:
    kept = [f for f in frames if not (f["type"] == "typing" and f["user"] == username)]
    if not kept:
        return None
    return Encoded(kept[0] if len(kept) == 1 else protocol.batch(kept))


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


async def get_hub() -> Hub:
    """The running loop's hub, created and started on first use."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        layer = get_channel_layer()
        assert layer is not None, "CHANNEL_LAYERS must configure a default layer"
        hub = _hubs[loop] = Hub(layer)
    await hub.start()
    return hub


def all_hubs() -> list[Hub]:
    """Every hub in this process (one per event loop; in practice one)."""
    return list(_hubs.values())


def current_hub() -> Hub | None:
    """The running loop's hub if one was started, without creating one."""
    try:
        return _hubs.get(asyncio.get_running_loop())
    except RuntimeError:
        return None
