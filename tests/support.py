"""Helpers for tests that run real things: redis-server, server processes, socket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import websockets
from channels.testing import WebsocketCommunicator
from websockets.typing import Subprotocol

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A throwaway redis-server on a free port, nothing persisted."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="chat-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ServerProcess:
    """One chat server process (Daphne or Uvicorn) on its own port."""

    env: dict[str, str]
    server: str = "daphne"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def command(self) -> list[str]:
        app = "esports_chat.asgi:application"
        if self.server == "uvicorn":
            return [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ws",
                "websockets-sansio",
                "--ws-max-size",
                "65536",
                "--backlog",
                "4096",
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        return [
            sys.executable,
            "-m",
            "esports_chat.daphne_uvloop",  # Daphne as deployed: on uvloop
            "-e",
            f"tcp:port={self.port}:interface=127.0.0.1:backlog=4096",
            "--websocket-max-message-size",
            "65536",
            "-v",
            "0",
            app,
        ]

    def start(self) -> ServerProcess:
        fd, name = tempfile.mkstemp(prefix=f"chat-{self.server}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        env = {**os.environ, **self.env}
        # Test processes may relax Django's async-safety check for their own setup code; the
        # server under test never does.
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, proc=self.proc)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    started: list[ServerProcess] = []
    try:
        for server in servers:
            started.append(server.start())
        yield servers
    finally:
        for server in started:
            server.stop()


class Client:
    """A real WebSocket client speaking the chat protocol; answers pings like a browser."""

    def __init__(self, ws: Any, fmt: str) -> None:
        self.ws = ws
        self.fmt = fmt
        self.hello: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls, url: str, *, token: str | None = None, fmt: str = "json", **kwargs: Any
    ) -> Client:
        if token is not None:
            url = f"{url}?token={token}"
        protocols = [Subprotocol("chat.msgpack" if fmt == "msgpack" else "chat.json")]
        ws = await websockets.connect(url, subprotocols=protocols, max_size=2**22, **kwargs)
        client = cls(ws, fmt)
        client.hello = await client.expect("hello")
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        if self.fmt == "msgpack":
            await self.ws.send(msgpack.packb(frame))
        else:
            await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame that is not a ping (pings are answered)."""
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            frame = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
            if frame.get("type") == "ping":
                await self.send({"type": "pong", "n": frame.get("n")})
                continue
            return frame

    async def events(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next frame, with batches unpacked into their events."""
        frame = await self.recv(timeout)
        if frame["type"] == "batch":
            return list(frame["messages"])
        return [frame]

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip frames until one of `kind` arrives (presence updates and the like)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind!r} frame within {timeout}s")
            for frame in await self.events(remaining):
                if frame["type"] == kind:
                    return frame

    async def messages(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Collect the next `count` chat messages, skipping other frames."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(got)} of {count} messages")
            got.extend(f for f in await self.events(remaining) if f["type"] == "message")
        return got

    async def join(self, room: str, since: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = since
        await self.send(frame)
        return await self.expect("joined")

    async def post(self, room: str, body: str, client_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "message", "room": room, "body": body}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.send(frame)

    async def close(self) -> None:
        await self.ws.close()


ORIGIN = [(b"origin", b"http://testserver"), (b"host", b"testserver")]


class Sock:
    """A WebsocketCommunicator that speaks the chat protocol like a well-behaved client."""

    def __init__(self, communicator: WebsocketCommunicator, fmt: str) -> None:
        self.c = communicator
        self.fmt = fmt
        self.subprotocol: str | None = None
        self.kept: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls,
        *,
        token: str | None = None,
        fmt: str = "json",
        headers: list[tuple[bytes, bytes]] | None = None,
        expect_hello: bool = True,
    ) -> Sock:
        path = "/ws/chat/" + (f"?token={token}" if token else "")
        subprotocols = ["chat.msgpack"] if fmt == "msgpack" else ["chat.json"]
        communicator = WebsocketCommunicator(
            _application(),
            path,
            headers=ORIGIN if headers is None else headers,
            subprotocols=subprotocols,
        )
        connected, subprotocol = await communicator.connect()
        assert connected, "handshake refused"
        sock = cls(communicator, fmt)
        sock.subprotocol = subprotocol if isinstance(subprotocol, str) else None
        if expect_hello:
            assert (await sock.recv())["type"] == "hello"
        return sock

    async def send(self, frame: Any) -> None:
        if self.fmt == "msgpack":
            await self.c.send_to(bytes_data=msgpack.packb(frame))
        else:
            await self.c.send_to(text_data=json.dumps(frame))

    async def recv_raw(self, timeout: float = 3) -> dict[str, Any]:
        return await self.c.receive_output(timeout)

    async def recv(self, timeout: float = 3) -> dict[str, Any]:
        while True:
            out = await self.c.receive_output(timeout)
            assert out["type"] == "websocket.send", out
            if self.fmt == "msgpack":
                assert out.get("bytes") is not None, "msgpack sockets get binary frames"
                frame = msgpack.unpackb(out["bytes"])
            else:
                assert out.get("text") is not None, "json sockets get text frames"
                frame = json.loads(out["text"])
            if frame["type"] == "ping":
                await self.send({"type": "pong", "n": frame["n"]})
                continue
            return frame

    async def events(self, timeout: float = 3) -> list[dict[str, Any]]:
        frame = await self.recv(timeout)
        return frame["messages"] if frame["type"] == "batch" else [frame]

    async def expect(self, kind: str, timeout: float = 3) -> dict[str, Any]:
        """The next frame of `kind`; frames of other kinds that arrive first are kept."""
        return await self.gather_any(kind, timeout=timeout)

    async def gather(self, *kinds: str, timeout: float = 3) -> dict[str, dict[str, Any]]:
        """The next frame of each kind, in whatever order they come."""
        found: dict[str, dict[str, Any]] = {}
        for _ in kinds:
            frame = await self.gather_any(*(k for k in kinds if k not in found), timeout=timeout)
            found[frame["type"]] = frame
        return found

    async def gather_any(self, *kinds: str, timeout: float = 3) -> dict[str, Any]:
        """The next frame of any of these kinds. Frames of other kinds are kept for later
        calls, so asking for an ack never loses the broadcast that came before it."""
        for index, frame in enumerate(self.kept):
            if frame["type"] in kinds:
                return self.kept.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frames = await self.events(max(0.01, deadline - loop.time()))
            for index, frame in enumerate(frames):
                if frame["type"] in kinds:
                    self.kept.extend(frames[index + 1 :])
                    return frame
                self.kept.append(frame)

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "join", "room": room, **extra})
        return await self.expect("joined")

    async def nothing(self) -> bool:
        return await self.c.receive_nothing(0.2)

    async def close(self) -> None:
        await self.c.disconnect()


def _application() -> Any:
    from esports_chat.asgi import application

    return application
