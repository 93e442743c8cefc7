"""What the reliability tests drive: killable Redis, a Sentinel group, raw and resilient clients.

- `Redis`: a redis-server on a fixed port that a test can SIGKILL, restart on the same port,
  SIGSTOP and SIGCONT; optionally a replica of another one.
- `SentinelGroup`: a primary, a replica and three sentinels, all Debian binaries on loopback.
- `Member`: a chat client that behaves the way docs/protocol.md asks a client to: it answers
  pings, re-joins with `since` after a `resync` or a reconnect, resends unanswered posts with
  their `client_id`, and records every message id it saw, so a test can count what arrived.
- `RawSocket`: a WebSocket spoken by hand over a plain socket, for clients that misbehave on
  purpose (stop reading, never pong, send garbage).
- `rss` and `metric`: what a server process uses, from /proc and from its metrics port.

Every wait is bounded; every address is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import redis
import websockets
from websockets.typing import Subprotocol

from tests.support import free_port, wait_for_port

# --- processes -------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """VmRSS of a process in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(port: int) -> dict[str, float]:
    """Every sample of a process's /metrics, keyed `name{labels}` (labels as exposed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


async def metric(port: int, key: str) -> float:
    """One sample, 0 if absent; read in a thread so the event loop keeps serving clients."""
    samples = await asyncio.get_running_loop().run_in_executor(None, metrics, port)
    return samples.get(key, 0.0)


async def until(
    check: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> float:
    """Poll `check` (sync or async) until truthy; returns seconds waited, or raises.

    `what` names the condition in the failure; a callable is asked at failure time, so it
    can describe the state then."""
    started = time.monotonic()
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            described = what() if callable(what) else what
            raise AssertionError(f"{described}: not within {timeout:.1f} s")
        await asyncio.sleep(interval)


# --- Redis -----------------------------------------------------------------------------------


class Redis:
    """A redis-server on its own fixed port: killable, restartable, freezable. No persistence,
    so a restart comes back empty, the harshest case (every key and subscription gone)."""

    def __init__(self, *, replica_of: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.replica_of = replica_of
        self.dir = tempfile.mkdtemp(prefix="chat-rel-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Redis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.dir]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: every connection drops, nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must not stay a zombie
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """A primary, one replica and three sentinels watching them, with test-sized timeouts:
    a primary is down after 1 s without answers, failovers time out after 3 s."""

    MASTER = "chatprimary"

    def __init__(self) -> None:
        self.primary = Redis()
        self.replica = Redis(replica_of=self.primary.port)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="chat-rel-sentinel-"))
        binary = shutil.which("redis-sentinel")
        self.command: list[str]
        if binary is not None:
            self.command = [binary]
        else:  # the same program: redis-sentinel is redis-server in sentinel mode
            server = shutil.which("redis-server")
            if server is None:
                raise RuntimeError("install redis-server and redis-sentinel")
            self.command = [server, "--sentinel"]

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS for the servers."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        self._wait_replicated()
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 3000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            cmd = [*self.command[:1], str(conf), *self.command[1:]]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sentinels.append(proc)
            wait_for_port(port, proc=proc)
        # Sentinels must have found the replica and each other before a failover can work.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(self._knows_everyone(port) for port in self.sentinel_ports):
                return self
            time.sleep(0.2)
        raise TimeoutError("sentinels did not discover the replica and each other")

    def _wait_replicated(self) -> None:
        deadline = time.monotonic() + 20
        client = self.replica.client()
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                info = client.info("replication")
                if info.get("master_link_status") == "up":
                    return
            time.sleep(0.1)
        raise TimeoutError("the replica did not sync with the primary")

    def _knows_everyone(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=2)
        try:
            master: Any = client.sentinel_master(self.MASTER)
            return int(master["num-slaves"]) >= 1 and int(master["num-other-sentinels"]) >= 2
        except (redis.RedisError, KeyError, ValueError):
            return False
        finally:
            client.close()

    def master_port(self) -> int | None:
        """The primary's port as the sentinels now name it."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
                if addr:
                    return int(addr[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def cleanup(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.primary.cleanup()
        self.replica.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- a client that recovers ------------------------------------------------------------------

_ids = itertools.count()


class Member:
    """A chat client that recovers like docs/protocol.md says, and counts what it saw.

    It connects to one of `urls()` (tried in turn after a failure), joins `rooms`, and from then
    on keeps itself in them: after a `resync` it re-joins the room with `since`; after the
    socket closes (except 4001 and 4003) it reconnects with backoff, re-joins every room with
    `since` and resends every post that got neither an ack nor a stored id.
    """

    def __init__(
        self,
        name: str,
        token: str,
        urls: Callable[[], Sequence[str]],
        rooms: Sequence[str],
        *,
        fmt: str = "json",
        first_url: int = 0,
    ) -> None:
        self.name = name
        self.token = token
        self.urls = urls
        self.rooms = list(rooms)
        self.fmt = fmt
        self.url_index = first_url
        self.ws: Any = None
        self.seen: dict[str, set[int]] = {room: set() for room in rooms}
        self.last: dict[str, int] = {}
        self.joined: dict[str, asyncio.Event] = {room: asyncio.Event() for room in rooms}
        self.online: dict[str, int] = {}
        self.sent_at: dict[str, float] = {}
        self.answered: dict[str, tuple[str, float, dict[str, Any]]] = {}
        self.pending: dict[str, tuple[str, str]] = {}
        self.room_of: dict[str, str] = {}  # client_id -> room, for every post
        self.acked: dict[str, int] = {}  # client_id -> id, from `ack`
        self.stored: dict[str, int] = {}  # client_id -> id, from `error unavailable {id}`
        self.errors: collections.Counter[str] = collections.Counter()
        self.resyncs = 0
        self.connects = 0
        self.close_codes: list[int | None] = []
        self.closed_at: list[float] = []  # monotonic times of the closes
        self.latencies: list[tuple[float, float]] = []  # (receipt time, seconds since ts)
        self.connected = asyncio.Event()
        self.stopped = False
        self.terminal: int | None = None
        self._task: asyncio.Task[None] | None = None

    # lifecycle

    def start(self) -> Member:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        return self

    async def ready(self, timeout: float = 15.0) -> None:
        """Connected and joined to every room."""
        async with asyncio.timeout(timeout):
            for event in self.joined.values():
                await event.wait()

    async def stop(self) -> None:
        self.stopped = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while not self.stopped:
            urls = list(self.urls())
            url = urls[self.url_index % len(urls)]
            try:
                await self._session(url)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                self.url_index += 1  # the next try goes to another process
            if self.stopped or self.terminal is not None:
                return
            # Backoff with full jitter, kept short: tests measure recovery in seconds.
            await asyncio.sleep(random.uniform(0.05, min(1.0, 0.2 * 2 ** min(failures, 4))))

    async def _session(self, url: str) -> None:
        protocols = [Subprotocol("chat.msgpack" if self.fmt == "msgpack" else "chat.json")]
        ws = await websockets.connect(
            f"{url}?token={self.token}",
            subprotocols=protocols,
            max_size=2**22,
            open_timeout=5,
            ping_interval=None,
            close_timeout=1,
        )
        self.ws = ws
        for event in self.joined.values():
            event.clear()
        try:
            hello = await asyncio.wait_for(self._read(), 5)
            if hello.get("type") != "hello":
                raise ConnectionError(f"expected hello, got {hello}")
            self.connects += 1
            self.connected.set()
            for room in self.rooms:
                await self._join(room)
            while True:
                frame = await self._read()
                await self._handle(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connected.clear()
            self.ws = None
            code = ws.close_code
            self.close_codes.append(code)
            self.closed_at.append(time.monotonic())
            if code in (4001, 4003):
                self.terminal = code
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1)

    async def _read(self) -> dict[str, Any]:
        raw = await self.ws.recv()
        frame = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def _send(self, frame: dict[str, Any]) -> None:
        ws = self.ws
        if ws is None:
            return
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(msgpack.packb(frame) if self.fmt == "msgpack" else json.dumps(frame))

    async def _join(self, room: str, floor: int | None = None) -> None:
        frame: dict[str, Any] = {"type": "join", "room": room}
        if room in self.last:
            frame["since"] = self.last[room]
        elif self.connects > 1 or self.resyncs:
            frame["since"] = 0
        if floor is not None and floor < frame.get("since", floor + 1):
            frame["since"] = floor
        await self._send(frame)

    # frames

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "batch":
            for inner in frame["messages"]:
                await self._handle(inner)
        elif kind == "ping":
            await self._send({"type": "pong", "n": frame.get("n")})
        elif kind == "message":
            self._saw(frame)
        elif kind == "joined":
            room = frame["room"]
            for message in frame["history"]:
                self._saw(message, live=False)
            self.online[room] = frame["online"]
            if room in self.joined:
                self.joined[room].set()
            # Posts that never got an answer are resent as they were; the server answers a
            # resend of a stored message with its original ack.
            for client_id, (post_room, body) in list(self.pending.items()):
                if post_room == room:
                    await self._send_post(client_id, post_room, body)
        elif kind == "resync":
            self.resyncs += 1
            await self._join(frame["room"], frame.get("since"))
        elif kind == "presence":
            self.online[frame["room"]] = frame["online"]
        elif kind == "ack":
            self._answer(frame.get("client_id"), "ack", frame)
            if frame.get("client_id") is not None:
                self.acked[frame["client_id"]] = frame["id"]
        elif kind == "error":
            self.errors[frame["code"]] += 1
            ref = frame.get("ref")
            if ref in self.sent_at:
                self._answer(ref, "error", frame)
                if frame.get("id") is not None:
                    self.stored[ref] = frame["id"]
            elif ref in self.joined and frame["code"] == "unavailable":
                # A join refused while Redis is away: try again shortly, as a client should.
                asyncio.get_running_loop().call_later(
                    0.5, lambda: asyncio.ensure_future(self._join(ref))
                )

    def _saw(self, message: dict[str, Any], live: bool = True) -> None:
        room = message["room"]
        self.seen.setdefault(room, set()).add(message["id"])
        if message["id"] > self.last.get(room, 0):
            self.last[room] = message["id"]
        if live:
            now = time.time()
            self.latencies.append((now, now - message["ts"] / 1000))

    def _answer(self, client_id: str | None, kind: str, frame: dict[str, Any]) -> None:
        if client_id is None or client_id in self.answered:
            return
        self.answered[client_id] = (kind, time.monotonic(), frame)
        self.pending.pop(client_id, None)

    # posting

    async def post(self, room: str, body: str | None = None) -> str:
        """Post (or queue, while disconnected) a message; returns its client_id."""
        client_id = f"{self.name}-{next(_ids)}"
        self.pending[client_id] = (room, body or client_id)
        self.room_of[client_id] = room
        self.sent_at[client_id] = time.monotonic()
        await self._send_post(client_id, room, body or client_id)
        return client_id

    async def _send_post(self, client_id: str, room: str, body: str) -> None:
        if self.ws is not None and self.joined[room].is_set():
            await self._send(
                {"type": "message", "room": room, "body": body, "client_id": client_id}
            )

    def answer_seconds(self, client_id: str) -> float | None:
        answer = self.answered.get(client_id)
        return None if answer is None else answer[1] - self.sent_at[client_id]


def missing(members: Sequence[Member], ids_by_room: dict[str, set[int]]) -> dict[str, int]:
    """How many of each room's ids each member has not seen (members with none left out)."""
    report = {}
    for member in members:
        count = sum(
            len(ids - member.seen.get(room, set()))
            for room, ids in ids_by_room.items()
            if room in member.rooms
        )
        if count:
            report[member.name] = count
    return report


# --- a WebSocket by hand -----------------------------------------------------------------------

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame, masked unless told otherwise; `length` may lie about the payload."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


class RawSocket:
    """A WebSocket client over a plain non-blocking socket: nothing is read unless asked.

    `rcvbuf` shrinks the kernel's receive buffer before connecting, so a client that stops
    reading makes the server's writes back up at once instead of after megabytes.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.status = 0
        self.close_code: int | None = None
        self.eof = False
        self.msgpack = False  # the chat.msgpack subprotocol: frames are binary msgpack

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        token: str | None = None,
        rcvbuf: int | None = None,
        handshake: bool = True,
        origin: str | None = None,
        subprotocol: str = "chat.json",
    ) -> RawSocket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        raw = cls(sock)
        raw.msgpack = subprotocol == "chat.msgpack"
        if handshake:
            await raw.handshake(port, token=token, origin=origin, subprotocol=subprotocol)
        return raw

    async def handshake(
        self,
        port: int,
        *,
        token: str | None,
        origin: str | None = None,
        subprotocol: str = "chat.json",
    ) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        query = f"?token={token}" if token else ""
        lines = [
            f"GET /ws/chat/{query} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {subprotocol}",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        await self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            if not await self.fill(5):
                raise ConnectionError("closed during the handshake")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    async def send_raw(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_sendall(self.sock, data), 10)

    async def send_frame(self, opcode: int, payload: bytes, **kwargs: Any) -> None:
        await self.send_raw(client_frame(opcode, payload, **kwargs))

    async def send_json(self, frame: dict[str, Any]) -> None:
        """Send a chat frame in the socket's format (JSON text, or msgpack binary)."""
        if self.msgpack:
            await self.send_frame(OP_BINARY, msgpack.packb(frame))
        else:
            await self.send_frame(OP_TEXT, json.dumps(frame).encode())

    async def fill(self, timeout: float) -> bool:
        """Read what the kernel has (waiting up to `timeout`); False at EOF or reset."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        offset = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, offset = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, offset = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < offset + n:
            return None
        payload = buf[offset : offset + n]
        self.buf = buf[offset + n :]
        return opcode, payload

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next frame (opcode, payload); None once the connection ended."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                if frame[0] == OP_CLOSE and len(frame[1]) >= 2:
                    self.close_code = struct.unpack("!H", frame[1][:2])[0]
                return frame
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame")
            await self.fill(remaining)

    async def read_until_closed(
        self, timeout: float = 10.0, *, answer_pings: bool = False
    ) -> list[dict[str, Any]]:
        """Read every frame until a close frame or EOF; returns the chat frames seen."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"still open after {timeout:.1f} s; got {frames[-3:]}")
            frame = await self.read_frame(remaining)
            if frame is None or frame[0] == OP_CLOSE:
                return frames
            opcode, payload = frame
            if opcode in (OP_TEXT, OP_BINARY):
                decoded = json.loads(payload) if opcode == OP_TEXT else msgpack.unpackb(payload)
                frames.append(decoded)
                if answer_pings and decoded.get("type") == "ping":
                    await self.send_json({"type": "pong", "n": decoded["n"]})

    async def next_json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next chat frame (text or binary), skipping WebSocket control frames."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.read_frame(max(0.01, deadline - time.monotonic()))
            if frame is None:
                raise ConnectionError("closed")
            opcode, payload = frame
            if opcode == OP_CLOSE:
                raise ConnectionError(f"closed with {self.close_code}")
            if opcode == OP_TEXT:
                value: dict[str, Any] = json.loads(payload)
                return value
            if opcode == OP_BINARY:
                value = msgpack.unpackb(payload)
                return value

    def kernel_queued(self) -> int:
        """Bytes waiting in this socket's kernel receive queue (unread by us)."""
        import fcntl
        import termios

        buf = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
