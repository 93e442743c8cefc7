"""The load generator behind `manage.py chat_loadtest`: raw WebSocket clients in worker processes.

This module has no Django in it: worker processes import only this file, the standard
library, orjson, msgpack and (when installed) uvloop. The management command seeds rooms and
users, issues tokens, builds a `Plan` and calls `run(plan)`, which returns a plain dict.

How a run goes:

    main                              workers (K processes, `--workers`)
    ----                              -------
    start K workers (spawn)           raise RLIMIT_NOFILE, start an event loop (uvloop if any)
    "warmup"          ------------->  worker 0 opens and closes one socket per server URL
    read server RSS (the baseline)
    "connect" at T    ------------->  open socket j at T + j / connect_rate (open loop), join
                      <-------------  "connected": counts, failures, connect/join histograms
    "start" at t0     ------------->  post message i at t0 + i / rate (open loop) for
    read server CPU at t0             `duration` seconds, then drain until every expected
    read server CPU at t0 + duration  delivery arrived (or a bounded drain timeout)
                      <-------------  "done": counts, latency histogram
    merge, compute, return a dict     close every socket, exit

Socket j (0 <= j < N) is user `<prefix>-j`, joins room j % R, connects to URL j % U and
belongs to worker j % K. Message i goes to room i % R and is posted by one of that room's
members in turn, so senders rotate and every member both posts and receives. The body carries
the run id and the scheduled send time; latency is measured from that *scheduled* time to the
moment the frame is read, so a server (or generator) that falls behind cannot hide it
(no coordinated omission). Every member, sender included, must receive every message: expected
deliveries are sum over rooms of (messages posted to the room x sockets joined to it at t0).

The clients speak RFC 6455 directly on asyncio transports (client frames masked, no
extensions), because a general WebSocket library costs several times more CPU per frame and
the generator shares this machine with the server. They answer the server's application
`ping {n}` with `pong {n}` at once, as the flow control requires, and protocol pings with pongs.

Everything waits with a bound: a server that stops answering, dies or closes sockets shows up
as failed connects, closed sockets and loss, never as a hang.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import orjson

# --- latency histogram -----------------------------------------------------------------------
#
# Microseconds, log-linear: exact below 1,024 us, then 512 buckets per power of two (0.2 %
# resolution), up to 2**40 us. Recording is a bit_length and a list increment; histograms from
# workers merge by adding.

_EXACT = 1024
_SUB = 512
HIST_BUCKETS = _EXACT + 31 * _SUB
_HIST_MAX_US = (1 << 40) - 1


def bucket(us: int) -> int:
    if us < _EXACT:
        return us if us > 0 else 0
    if us > _HIST_MAX_US:
        us = _HIST_MAX_US
    shift = us.bit_length() - 10
    return _EXACT + (shift - 1) * _SUB + ((us >> shift) - _SUB)


def bucket_value(index: int) -> float:
    """The midpoint, in microseconds, of the values a bucket holds."""
    if index < _EXACT:
        return float(index)
    k = index - _EXACT
    shift = k // _SUB + 1
    low = (k % _SUB + _SUB) << shift
    return low + (1 << shift) / 2


class Histogram:
    __slots__ = ("count", "counts", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * HIST_BUCKETS
        self.count = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        self.counts[bucket(us)] += 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        mine = self.counts
        for index, value in enumerate(other.counts):
            if value:
                mine[index] += value
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def to_wire(self) -> dict[str, Any]:
        return {
            "n": self.count,
            "max": self.max_us,
            "b": {i: c for i, c in enumerate(self.counts) if c},
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        for index, value in data["b"].items():
            hist.counts[int(index)] = value
        hist.count = data["n"]
        hist.max_us = data["max"]
        return hist

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) in milliseconds, None when empty."""
        if not self.count:
            return None
        if q >= 100:
            return self.max_us / 1000
        rank = max(1, -(-self.count * q // 100))
        seen = 0
        for index, value in enumerate(self.counts):
            seen += value
            if seen >= rank:
                return min(bucket_value(index), self.max_us) / 1000
        return self.max_us / 1000

    def summary(self, *qs: float) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for q in qs:
            value = self.percentile(q)
            out["max" if q >= 100 else f"p{q:g}"] = None if value is None else round(value, 2)
        return out


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str


@dataclass
class Plan:
    """Everything a run needs; pickled to every worker."""

    targets: list[Target]
    tokens: list[str]  # one per socket, socket j uses tokens[j]
    rooms: list[str]  # room slugs; socket j joins rooms[j % len(rooms)]
    mode: str = "load"  # load | storm | idle
    rate: float = 5.0  # messages per second, all rooms together
    duration: float = 10.0  # seconds of sending (load) or of idling (idle)
    connect_rate: float = 500.0  # connects per second, all workers together
    connect_timeout: float = 10.0  # per socket: TCP + handshake + hello + joined
    drain: float = 10.0  # at most this long after the last send, waiting for deliveries
    drain_quiet: float = 3.0  # ... or until nothing arrived for this long
    warmup: float = 1.0  # seconds between the last connect and t0
    workers: int = 1
    fmt: str = "json"  # json | msgpack
    body_bytes: int = 64
    join: bool = True
    warmup_token: str | None = None  # opens (and closes) one socket per target first
    server_pids: list[int] = field(default_factory=list)
    redis_pid: int | None = None
    progress: bool = True
    run_id: str = field(default_factory=lambda: os.urandom(4).hex())

    @property
    def sockets(self) -> int:
        return len(self.tokens)

    def messages(self) -> int:
        return int(self.rate * self.duration) if self.mode == "load" else 0


def room_members(plan: Plan, room: int) -> int:
    """How many sockets join room `room`."""
    n, r = plan.sockets, len(plan.rooms)
    return (n - room + r - 1) // r if room < n else 0


def message_sender(plan: Plan, i: int) -> tuple[int, int]:
    """(room index, socket index) of message i."""
    r = len(plan.rooms)
    room = i % r
    members = room_members(plan, room)
    return room, room + r * ((i // r) % members)


# --- /proc readings --------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_cpu_us(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in microseconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // _TICKS


def proc_rss(pid: int) -> int | None:
    """Resident set size in bytes; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _sum(values: Iterable[int | None]) -> int | None:
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


# --- the WebSocket client --------------------------------------------------------------------

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_BODY_TIME_WIDTH = 17  # "%017.6f" of a Unix time


def _mask(payload: bytes) -> bytes:
    key = random.getrandbits(32).to_bytes(4, "big")
    n = len(payload)
    if not n:
        return key
    keys = (key * (n // 4 + 1))[:n]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")
    return key + masked.to_bytes(n, "little")


def frame_bytes(opcode: int, payload: bytes) -> bytes:
    """One client frame: FIN set, masked as RFC 6455 requires of clients."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + _mask(payload)


class Client(asyncio.Protocol):
    """One chat socket. Frames are parsed in data_received; nothing awaits per frame."""

    def __init__(self, worker: Worker, index: int, room: int) -> None:
        self.worker = worker
        self.index = index
        self.room = room
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buf = b""
        self.fragments: list[bytes] = []
        self.fragment_op = 0
        self.hello: asyncio.Future[None] = worker.loop.create_future()
        self.joined: asyncio.Future[None] = worker.loop.create_future()
        self.closed = False
        self.close_code: int | None = None
        self.fail_reason = ""
        self.delivered = 0
        self.msgpack = worker.plan.fmt == "msgpack"
        self.opcode = _OP_BINARY if self.msgpack else _OP_TEXT

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 16384:
                    self._fail("handshake response too long")
                else:
                    self.buf = data
                return
            if not self._handshake(data[:end]):
                return
            data = data[end + 4 :]
        now = time.time()
        pos, n = 0, len(data)
        while n - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:
                self._fail("server sent a masked frame")
                return
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode >= _OP_CLOSE:
                self._control(opcode, payload)
                if self.closed:
                    return
                continue
            if not b0 & 0x80:  # a fragment: keep it until the final one
                if opcode:
                    self.fragment_op = opcode
                self.fragments.append(payload)
                continue
            if opcode == _OP_CONT:
                self.fragments.append(payload)
                payload = b"".join(self.fragments)
                opcode = self.fragment_op
                self.fragments = []
            self._message(payload, now)
        if pos < n:
            self.buf = data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if self.close_code is None:
                self.close_code = 1006
        self.worker.on_closed(self)
        err = ConnectionError(f"closed ({self.close_code})")
        _fail_future(self.hello, err)
        _fail_future(self.joined, err)

    # handshake and frames

    def _handshake(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            code = status[1].decode("latin-1") if len(status) > 1 else "?"
            self._fail(f"http {code}")
            return False
        if self.msgpack:
            offered = b"sec-websocket-protocol: chat.msgpack"
            if not any(line.lower() == offered for line in lines[1:]):
                self._fail("server did not select chat.msgpack")
                return False
        self.upgraded = True
        return True

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            self._write(_OP_PONG, payload)
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self._write(_OP_CLOSE, payload[:2])
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _message(self, payload: bytes, now: float) -> None:
        worker = self.worker
        # The server writes the same bytes to every member of a room, so a room event is
        # parsed once per worker, not once per socket: at hype rates parsing is most of what
        # the generator would otherwise spend, and it must not become the bottleneck.
        seen = worker.seen.get(payload)
        if seen is None:
            try:
                frame = msgpack.unpackb(payload) if self.msgpack else orjson.loads(payload)
                kind = frame["type"]
            except Exception:
                worker.bad_frames += 1
                return
            if kind == "batch":
                items = frame["messages"]
            elif kind == "message":
                items = [frame]
            else:
                self._event(frame)  # meant for this socket alone (ack, ping, joined...)
                return
            seen = self._digest(items)
            if len(worker.seen) >= 256:
                worker.seen.clear()
            worker.seen[payload] = seen
        deliveries, events = seen
        for event in events:
            self._event(event)
        if not deliveries:
            return
        now_us = int(now * 1_000_000)
        hist, fanout = worker.latency, worker.fanout
        for sent_us, ts_us in deliveries:
            if ts_us:
                fanout.add(now_us - ts_us)
            us = now_us - sent_us
            hist.counts[bucket(us)] += 1
            hist.count += 1
            if us > hist.max_us:
                hist.max_us = us
        self.delivered += len(deliveries)
        worker.delivered += len(deliveries)

    def _digest(
        self, items: list[dict[str, Any]]
    ) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
        """(scheduled send, server timestamp) in microseconds of each of this run's messages
        in a room event, and the other events in it (presence, typing)."""
        worker = self.worker
        marker = worker.marker
        start = len(marker)
        deliveries: list[tuple[int, int]] = []
        events: list[dict[str, Any]] = []
        for item in items:
            if item.get("type") != "message":
                events.append(item)
                continue
            body = item.get("body")
            if not isinstance(body, str) or not body.startswith(marker):
                continue
            try:
                sent = float(body[start : start + _BODY_TIME_WIDTH])
            except ValueError:
                worker.bad_frames += 1
                continue
            ts = item.get("ts")  # the server's clock when it stored the message (ms)
            deliveries.append((int(sent * 1_000_000), ts * 1000 if isinstance(ts, int) else 0))
        return deliveries, events

    def _event(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        worker = self.worker
        if kind == "ping":
            self.send({"type": "pong", "n": frame.get("n")})
        elif kind == "ack":
            client_id = str(frame.get("client_id", ""))
            if client_id.startswith(worker.marker):
                worker.acked += 1
                with contextlib.suppress(ValueError):
                    i = int(client_id[len(worker.marker) :])
                    sent = worker.t0 + i / worker.plan.rate
                    worker.ack.add(int((time.time() - sent) * 1_000_000))
        elif kind == "hello":
            if not self.hello.done():
                self.hello.set_result(None)
        elif kind == "joined":
            if not self.joined.done():
                self.joined.set_result(None)
        elif kind == "error":
            ref = str(frame.get("ref") or "")
            if ref.startswith(worker.marker):
                worker.rejected += 1
            else:
                worker.errors += 1
            worker.error_codes[str(frame.get("code"))] += 1
            if not self.joined.done() and ref in worker.plan.rooms:
                _fail_future(self.joined, ConnectionError(f"join refused: {frame.get('code')}"))

    def _write(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame_bytes(opcode, payload))

    def _fail(self, reason: str) -> None:
        self.fail_reason = reason
        self.closed = True
        err = ConnectionError(reason)
        _fail_future(self.hello, err)
        _fail_future(self.joined, err)
        if self.transport is not None:
            self.transport.abort()

    # the client side of the protocol

    def send(self, frame: dict[str, Any]) -> bool:
        if self.closed:
            return False
        self._write(self.opcode, msgpack.packb(frame) if self.msgpack else orjson.dumps(frame))
        return True

    async def open(self, target: Target, token: str, room: str | None) -> None:
        loop = self.worker.loop
        await loop.create_connection(lambda: self, target.host, target.port)
        key = base64.b64encode(os.urandom(16)).decode()
        protocol = "chat.msgpack" if self.msgpack else "chat.json"
        request = (
            f"GET {target.path}?token={token} HTTP/1.1\r\n"
            f"Host: {target.host}:{target.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        assert self.transport is not None
        self.transport.write(request.encode())
        await self.hello
        if room is not None:
            self.send({"type": "join", "room": room})
            await self.joined

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        self._write(_OP_CLOSE, struct.pack("!H", 1000))
        self.closed = True
        self.close_code = 1000
        self.transport.close()


# --- the worker process ----------------------------------------------------------------------


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# shared counters per worker, for the progress bar
_C_CONNECTED, _C_FAILED, _C_SENT, _C_DELIVERED, _C_CLOSED = range(5)
_COUNTERS = 5


class Worker:
    def __init__(
        self,
        plan: Plan,
        index: int,
        pipe: multiprocessing.connection.Connection,
        counters: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.plan = plan
        self.index = index
        self.pipe = pipe
        self.counters = counters
        self.loop = loop
        self.marker = f"lt:{plan.run_id}:"
        self.clients: dict[int, Client] = {}
        self.latency = Histogram()  # scheduled send -> delivery received
        self.fanout = Histogram()  # server's message ts -> delivery received
        # Room events already parsed, by their bytes (every member gets the same bytes).
        self.seen: dict[bytes, tuple[list[tuple[int, int]], list[dict[str, Any]]]] = {}
        self.ack = Histogram()  # scheduled send -> ack received by the sender
        self.send_lag = Histogram()  # scheduled send -> actually sent (the generator's own lag)
        self.t0 = 0.0
        self.connect_hist = Histogram()
        self.join_hist = Histogram()
        self.delivered = self.acked = self.rejected = self.errors = self.bad_frames = 0
        self.sent = self.unsent = 0
        self.connected = self.failed = 0
        self.fail_reasons: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.closed_during = 0
        self.measuring = False
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pad = "x" * max(0, plan.body_bytes - len(self.marker) - _BODY_TIME_WIDTH - 1)

    # plumbing

    def _on_pipe(self) -> None:
        try:
            self.inbox.put_nowait(self.pipe.recv())
        except (EOFError, OSError):
            self.inbox.put_nowait({"cmd": "abort"})
            self.loop.remove_reader(self.pipe.fileno())

    async def command(self) -> dict[str, Any]:
        return await self.inbox.get()

    def report(self, message: dict[str, Any]) -> None:
        self.pipe.send(message)

    def publish_counters(self) -> None:
        base = self.index * _COUNTERS
        counters = self.counters
        counters[base + _C_CONNECTED] = self.connected
        counters[base + _C_FAILED] = self.failed
        counters[base + _C_SENT] = self.sent
        counters[base + _C_DELIVERED] = self.delivered
        counters[base + _C_CLOSED] = self.closed_during

    async def _ticker(self) -> None:
        while True:
            self.publish_counters()
            await asyncio.sleep(0.2)

    def on_closed(self, client: Client) -> None:
        if self.clients.get(client.index) is client and self.measuring:
            self.closed_during += 1
            self.close_codes[str(client.close_code)] += 1

    # phases

    async def run(self) -> None:
        self.loop.add_reader(self.pipe.fileno(), self._on_pipe)
        ticker = self.loop.create_task(self._ticker())
        try:
            while True:
                msg = await self.command()
                cmd = msg["cmd"]
                if cmd == "warmup":
                    await self.warmup()
                elif cmd == "connect":
                    await self.connect_all(msg["at"])
                elif cmd == "start":
                    await self.send_all(msg["t0"])
                elif cmd == "hold":
                    self.measuring = True
                    self.report({"phase": "held", **self.snapshot()})
                elif cmd in ("finish", "abort"):
                    break
        finally:
            ticker.cancel()
            self.publish_counters()
            await self.close_all()

    async def warmup(self) -> None:
        plan = self.plan
        ok = 0
        if plan.warmup_token is not None:
            for target in plan.targets:
                client = Client(self, -1, 0)
                try:
                    async with asyncio.timeout(plan.connect_timeout):
                        await client.open(
                            target, plan.warmup_token, plan.rooms[0] if plan.join else None
                        )
                    ok += 1
                except Exception:
                    pass
                client.close()
        await asyncio.sleep(0.2)
        self.report({"phase": "warm", "ok": ok})

    async def connect_all(self, at: float) -> None:
        plan = self.plan
        mine = range(self.index, plan.sockets, plan.workers)
        tasks: list[asyncio.Task[None]] = []
        for j in mine:
            delay = at + j / plan.connect_rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(self.loop.create_task(self.connect_one(j, at + j / plan.connect_rate)))
        if tasks:
            await asyncio.wait(tasks, timeout=plan.connect_timeout + 5)
        self.measuring = plan.mode != "storm"
        self.report({"phase": "connected", **self.snapshot()})

    async def connect_one(self, j: int, scheduled: float) -> None:
        plan = self.plan
        room = j % len(plan.rooms)
        client = Client(self, j, room)
        target = plan.targets[j % len(plan.targets)]
        try:
            async with asyncio.timeout(plan.connect_timeout):
                await client.open(target, plan.tokens[j], None)
                self.connect_hist.add(int((time.time() - scheduled) * 1_000_000))
                if plan.join:
                    client.send({"type": "join", "room": plan.rooms[room]})
                    await client.joined
                    self.join_hist.add(int((time.time() - scheduled) * 1_000_000))
        except Exception as exc:
            self.failed += 1
            reason = client.fail_reason or _reason(exc)
            self.fail_reasons[reason] += 1
            client.closed = True
            if client.transport is not None:
                client.transport.abort()
            return
        self.clients[j] = client
        self.connected += 1

    async def send_all(self, t0: float) -> None:
        plan = self.plan
        rooms = len(plan.rooms)
        members_local = [0] * rooms
        for client in self.clients.values():
            if not client.closed:
                members_local[client.room] += 1
        posted_per_room = [0] * rooms
        scheduled_per_room = [0] * rooms
        total = plan.messages()
        mine: list[int] = []
        for i in range(total):
            room, sender = message_sender(plan, i)
            scheduled_per_room[room] += 1
            if sender % plan.workers == self.index:
                mine.append(i)
        self.t0 = t0
        expected_local = sum(s * m for s, m in zip(scheduled_per_room, members_local, strict=True))
        end = t0 + plan.duration
        window: dict[str, int] = {}

        def snapshot_window() -> None:
            window["delivered"] = self.delivered

        self.loop.call_at(self.loop.time() + max(0.0, end - time.time()), snapshot_window)
        pad = self.pad
        marker = self.marker
        give_up = end + plan.drain
        for i in mine:
            scheduled = t0 + i / plan.rate
            now = time.time()
            if now > give_up:
                # This generator fell so far behind that sending on would outlast the run.
                self.unsent += 1
                continue
            delay = scheduled - now
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.send_lag.add(int(-delay * 1_000_000))
            room, sender = message_sender(plan, i)
            poster = self.clients.get(sender)
            if poster is None or poster.closed:
                poster = next(
                    (c for c in self.clients.values() if c.room == room and not c.closed), None
                )
            if poster is None:
                self.unsent += 1
                continue
            body = f"{marker}{scheduled:017.6f} {pad}"
            poster.send(
                {
                    "type": "message",
                    "room": plan.rooms[room],
                    "body": body,
                    "client_id": f"{marker}{i}",
                }
            )
            self.sent += 1
            posted_per_room[room] += 1
        delay = end - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        # Drain: until every delivery this worker expects arrived, nothing arrived for
        # drain_quiet seconds, or drain seconds passed.
        deadline = min(time.time() + plan.drain, give_up + 5)
        last, last_change = self.delivered, time.time()
        while self.delivered < expected_local and time.time() < deadline:
            await asyncio.sleep(0.05)
            if self.delivered != last:
                last, last_change = self.delivered, time.time()
            elif time.time() - last_change > plan.drain_quiet:
                break
        await asyncio.sleep(0.05)
        if "delivered" not in window:
            window["delivered"] = self.delivered
        self.report(
            {
                "phase": "done",
                **self.snapshot(),
                "members": members_local,
                "posted": posted_per_room,
                "window_delivered": window["delivered"],
                "latency": self.latency.to_wire(),
                "fanout": self.fanout.to_wire(),
                "ack": self.ack.to_wire(),
                "send_lag": self.send_lag.to_wire(),
            }
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "failed": self.failed,
            "fail_reasons": dict(self.fail_reasons),
            "connect": self.connect_hist.to_wire(),
            "join": self.join_hist.to_wire(),
            "open": sum(1 for c in self.clients.values() if not c.closed),
            "sent": self.sent,
            "unsent": self.unsent,
            "acked": self.acked,
            "rejected": self.rejected,
            "errors": self.errors,
            "error_codes": dict(self.error_codes),
            "bad_frames": self.bad_frames,
            "delivered": self.delivered,
            "closed_during": self.closed_during,
            "close_codes": dict(self.close_codes),
            "cpu_us": _self_cpu_us(),
        }

    async def close_all(self) -> None:
        self.measuring = False
        for client in self.clients.values():
            client.close()
        await asyncio.sleep(0.2)
        for client in self.clients.values():
            if client.transport is not None and not client.transport.is_closing():
                client.transport.abort()


def _fail_future(fut: asyncio.Future[None], exc: BaseException) -> None:
    """Fail a future nobody may await any more without asyncio logging it as unretrieved."""
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:60]}" if text else type(exc).__name__


def _self_cpu_us() -> int:
    t = os.times()
    return int((t.user + t.system) * 1_000_000)


def worker_main(
    plan: Plan, index: int, pipe: multiprocessing.connection.Connection, counters: Any
) -> None:
    raise_fd_limit()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(Worker(plan, index, pipe, counters, loop).run())
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            loop.close()


# --- the coordinator (main process) ----------------------------------------------------------


class RunError(Exception):
    pass


class _Progress:
    """tqdm bars fed from the workers' shared counters; silent when disabled."""

    def __init__(self, enabled: bool, counters: Any, workers: int) -> None:
        self.enabled = enabled
        self.counters = counters
        self.workers = workers
        self.bar: Any = None

    def total(self, which: int) -> int:
        return sum(self.counters[w * _COUNTERS + which] for w in range(self.workers))

    def open(self, desc: str, total: float, unit: str) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=f"{desc:>7}",
            unit=unit,
            leave=True,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}",
        )

    def update(self, n: float, **postfix: Any) -> None:
        if self.bar is None:
            return
        self.bar.n = min(n, self.bar.total)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Coordinator:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        ctx = multiprocessing.get_context("spawn")
        self.counters = ctx.Array("q", plan.workers * _COUNTERS, lock=False)
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        self.progress = _Progress(plan.progress, self.counters, plan.workers)
        for index in range(plan.workers):
            mine, theirs = ctx.Pipe()
            own = Plan(**{**plan.__dict__})
            # Each worker gets only its own tokens; keep indices by blanking the others.
            own.tokens = [t if j % plan.workers == index else "" for j, t in enumerate(plan.tokens)]
            proc = ctx.Process(
                target=worker_main,
                args=(own, index, theirs, self.counters),
                name=f"chat-loadgen-{index}",
                daemon=True,
            )
            self.pipes.append(mine)
            self.procs.append(proc)

    # plumbing

    def broadcast(self, message: dict[str, Any]) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(message)

    def gather(
        self, phase: str, timeout: float, tick: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """One `phase` report from every worker within `timeout` seconds, or RunError."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.time() + timeout
        while len(got) < len(self.pipes):
            if time.time() > deadline:
                raise RunError(f"workers did not report {phase!r} within {timeout:.0f}s")
            for index, pipe in enumerate(self.pipes):
                if index in got:
                    continue
                try:
                    if pipe.poll(0):
                        msg = pipe.recv()
                        if msg.get("phase") == phase:
                            got[index] = msg
                except (EOFError, OSError):
                    raise RunError(f"worker {index} died during {phase!r}") from None
                if index not in got and not self.procs[index].is_alive():
                    raise RunError(f"worker {index} exited during {phase!r}")
            if tick is not None:
                tick()
            time.sleep(0.05)
        return [got[i] for i in range(len(self.pipes))]

    def server_cpu(self) -> int | None:
        return _sum(proc_cpu_us(pid) for pid in self.plan.server_pids)

    def server_rss(self) -> int | None:
        return _sum(proc_rss(pid) for pid in self.plan.server_pids)

    def workers_cpu(self) -> int | None:
        return _sum(proc_cpu_us(p.pid) for p in self.procs if p.pid is not None)

    def sleep_until(self, when: float, tick: Callable[[], None] | None = None) -> None:
        while True:
            left = when - time.time()
            if left <= 0:
                return
            if tick is not None:
                tick()
            time.sleep(min(left, 0.1))

    # the run

    def run(self) -> dict[str, Any]:
        for proc in self.procs:
            proc.start()
        try:
            return self._run()
        finally:
            self.progress.close()
            self.broadcast({"cmd": "finish"})
            for proc in self.procs:
                proc.join(5)
            for proc in self.procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(2)

    def _run(self) -> dict[str, Any]:
        plan = self.plan
        result: dict[str, Any] = {
            "mode": plan.mode,
            "run_id": plan.run_id,
            "urls": [f"ws://{t.host}:{t.port}{t.path}" for t in plan.targets],
            "sockets": plan.sockets,
            "rooms": len(plan.rooms),
            "workers": plan.workers,
            "format": plan.fmt,
        }
        self.pipes[0].send({"cmd": "warmup"})
        self._gather_one(0, "warm", plan.connect_timeout * len(plan.targets) + 30)
        time.sleep(0.3)
        rss_before = self.server_rss()

        # connect
        connect_at = time.time() + 0.3
        connect_span = plan.sockets / plan.connect_rate
        cpu_connect_0 = self.server_cpu()
        self.broadcast({"cmd": "connect", "at": connect_at})
        self.progress.open("connect", plan.sockets, "sock")

        def connect_tick() -> None:
            done = self.progress.total(_C_CONNECTED) + self.progress.total(_C_FAILED)
            self.progress.update(done, failed=self.progress.total(_C_FAILED))

        reports = self.gather(
            "connected", connect_span + plan.connect_timeout + 30 + 0.3, connect_tick
        )
        connect_done = time.time()
        cpu_connect_1 = self.server_cpu()
        connect_tick()
        self.progress.close()
        connected = sum(r["connected"] for r in reports)
        failed = sum(r["failed"] for r in reports)
        connect_hist, join_hist = Histogram(), Histogram()
        for r in reports:
            connect_hist.merge(Histogram.from_wire(r["connect"]))
            join_hist.merge(Histogram.from_wire(r["join"]))
        fail_reasons: Counter[str] = Counter()
        for r in reports:
            fail_reasons.update(r["fail_reasons"])
        result.update(
            connected=connected,
            failed=failed,
            fail_reasons=dict(fail_reasons),
            connect_ms=connect_hist.summary(50, 95, 99, 100),
            join_ms=join_hist.summary(50, 95, 99, 100) if plan.join else None,
            connect_seconds=round(connect_done - connect_at, 2),
        )
        server: dict[str, Any] = {"pids": plan.server_pids}
        result["server"] = server
        if plan.server_pids and cpu_connect_0 is not None and cpu_connect_1 is not None:
            used = cpu_connect_1 - cpu_connect_0
            server["cpu_us_per_connect"] = round(used / max(1, connected))

        if plan.mode == "storm":
            time.sleep(1.0)
            rss_after = self.server_rss()
            self._rss(server, rss_before, rss_after, connected)
            self.broadcast({"cmd": "hold"})
            held = self.gather("held", 10)
            result["closed_after_connect"] = connected - sum(r["open"] for r in held)
            return result

        if plan.mode == "idle":
            settle = time.time() + plan.warmup
            self.sleep_until(settle)
            cpu0, t_cpu0 = self.server_cpu(), time.time()
            self.broadcast({"cmd": "hold"})
            self.gather("held", 10)
            self.progress.open("idle", plan.duration, "s")
            end = time.time() + plan.duration
            self.sleep_until(end, lambda: self.progress.update(plan.duration - (end - time.time())))
            self.progress.close()
            cpu1, t_cpu1 = self.server_cpu(), time.time()
            rss_after = self.server_rss()
            self.broadcast({"cmd": "hold"})
            held = self.gather("held", 10)
            open_now = sum(r["open"] for r in held)
            result["open_at_end"] = open_now
            result["closed_during"] = sum(r["closed_during"] for r in held)
            result["close_codes"] = _merge_counts(r["close_codes"] for r in held)
            self._rss(server, rss_before, rss_after, connected)
            if cpu0 is not None and cpu1 is not None:
                server["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / 1e6 / (t_cpu1 - t_cpu0), 2)
            return result

        # load
        t0 = time.time() + plan.warmup
        # The servers' idle CPU (heartbeats, presence, timers) with every socket connected,
        # over the warmup after a settling second: subtracted for the net cost per delivery.
        idle: tuple[int, float] | None = None
        if plan.warmup >= 2:
            self.sleep_until(time.time() + 1)
            idle_cpu0, idle_t0 = self.server_cpu(), time.time()
            self.sleep_until(t0 - 0.05)
            idle_cpu1 = self.server_cpu()
            if idle_cpu0 is not None and idle_cpu1 is not None:
                idle = (idle_cpu1 - idle_cpu0, time.time() - idle_t0)
        self.sleep_until(t0 - 0.05)
        rss_at_t0 = self.server_rss()
        self._rss(server, rss_before, rss_at_t0, connected)
        self.broadcast({"cmd": "start", "t0": t0})
        self.sleep_until(t0)
        cpu0, gen0, redis0 = self.server_cpu(), self.workers_cpu(), _redis_cpu(plan)
        end = t0 + plan.duration
        self.progress.open("send", plan.duration, "s")

        def send_tick() -> None:
            self.progress.update(
                min(plan.duration, time.time() - t0),
                sent=self.progress.total(_C_SENT),
                delivered=self.progress.total(_C_DELIVERED),
                closed=self.progress.total(_C_CLOSED),
            )

        self.sleep_until(end, send_tick)
        cpu1, gen1, redis1 = self.server_cpu(), self.workers_cpu(), _redis_cpu(plan)
        self.progress.close()
        self.progress.open("drain", plan.drain, "s")
        drain_start = time.time()
        done = self.gather(
            "done",
            plan.drain + 60,
            lambda: self.progress.update(
                min(plan.drain, time.time() - drain_start),
                delivered=self.progress.total(_C_DELIVERED),
            ),
        )
        self.progress.close()

        latency, fanout, ack, lag = Histogram(), Histogram(), Histogram(), Histogram()
        for r in done:
            lag.merge(Histogram.from_wire(r["send_lag"]))
            latency.merge(Histogram.from_wire(r["latency"]))
            fanout.merge(Histogram.from_wire(r["fanout"]))
            ack.merge(Histogram.from_wire(r["ack"]))
        rooms = len(plan.rooms)
        members = [sum(r["members"][k] for r in done) for k in range(rooms)]
        posted = [sum(r["posted"][k] for r in done) for k in range(rooms)]
        expected = sum(p * m for p, m in zip(posted, members, strict=True))
        delivered = sum(r["delivered"] for r in done)
        window_delivered = sum(r["window_delivered"] for r in done)
        sent = sum(posted)
        result.update(
            rate=plan.rate,
            duration=plan.duration,
            sent=sent,
            unsent=sum(r["unsent"] for r in done),
            acked=sum(r["acked"] for r in done),
            rejected=sum(r["rejected"] for r in done),
            errors=sum(r["errors"] for r in done),
            error_codes=_merge_counts(r["error_codes"] for r in done),
            bad_frames=sum(r["bad_frames"] for r in done),
            members_at_start=sum(members),
            expected=expected,
            delivered=delivered,
            loss=max(0, expected - delivered),
            loss_pct=round(100 * max(0, expected - delivered) / expected, 3) if expected else 0.0,
            extra=max(0, delivered - expected),
            closed_during=sum(r["closed_during"] for r in done),
            close_codes=_merge_counts(r["close_codes"] for r in done),
            deliveries_per_s=round(window_delivered / plan.duration),
            latency_ms=latency.summary(50, 95, 99, 100),
            fanout_ms=fanout.summary(50, 95, 99, 100),
            ack_ms=ack.summary(50, 95, 99, 100),
            # How late the generator itself sent (only sends that were late are counted).
            send_lag_ms=lag.summary(99, 100),
            late_sends=lag.count,
        )
        if gen0 is not None and gen1 is not None:
            result["generator_cpu_pct"] = round(100 * (gen1 - gen0) / 1e6 / plan.duration, 1)
        if cpu0 is not None and cpu1 is not None:
            used = cpu1 - cpu0
            server["cpu_pct"] = round(100 * used / 1e6 / plan.duration, 1)
            server["cpu_us_per_delivery"] = (
                round(used / window_delivered, 2) if window_delivered else None
            )
            server["cpu_us_per_message"] = round(used / sent, 1) if sent else None
            if idle is not None:
                idle_used = idle[0] / idle[1] * plan.duration
                server["idle_cpu_pct_before"] = round(100 * idle[0] / 1e6 / idle[1], 1)
                server["cpu_us_per_delivery_net"] = (
                    round((used - idle_used) / window_delivered, 2) if window_delivered else None
                )
        if redis0 is not None and redis1 is not None:
            server["redis_cpu_pct"] = round(100 * (redis1 - redis0) / 1e6 / plan.duration, 1)
        return result

    def _gather_one(self, index: int, phase: str, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        pipe = self.pipes[index]
        while time.time() < deadline:
            try:
                if pipe.poll(0.1):
                    msg = pipe.recv()
                    if msg.get("phase") == phase:
                        return dict(msg)
            except (EOFError, OSError):
                break
            if not self.procs[index].is_alive():
                break
        raise RunError(f"worker {index} did not report {phase!r}")

    def _rss(
        self, server: dict[str, Any], before: int | None, after: int | None, sockets: int
    ) -> None:
        if before is None or after is None:
            return
        server["rss_mb"] = round(after / 2**20, 1)
        server["rss_delta_mb"] = round((after - before) / 2**20, 1)
        if sockets:
            server["rss_per_socket_kb"] = round((after - before) / sockets / 1024, 1)


def _redis_cpu(plan: Plan) -> int | None:
    return proc_cpu_us(plan.redis_pid) if plan.redis_pid else None


def _merge_counts(items: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for item in items:
        total.update(item)
    return dict(total)


def run(plan: Plan) -> dict[str, Any]:
    """Run the plan in worker processes and return the merged result (see the module doc)."""
    if plan.workers < 1:
        raise ValueError("workers must be at least 1")
    if not plan.tokens:
        raise ValueError("nothing to do: no sockets")
    if not plan.rooms and plan.join:
        raise ValueError("no rooms")
    return Coordinator(plan).run()
