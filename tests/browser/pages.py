"""The chat site as a test sees it: a server process and logged-in pages, plus small helpers."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

from playwright.sync_api import Browser, Page, expect
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from tests.support import ServerProcess

PASSWORD = "pw-for-tests-only"


class Chat:
    """One test's chat site: a server process, and pages of players logged in to it."""

    def __init__(self, browser: Browser, server: ServerProcess) -> None:
        self.browser = browser
        self.server = server
        self.contexts: list[Any] = []
        self.errors: list[str] = []  # uncaught exceptions in any page

    def url(self, path: str) -> str:
        # One origin everywhere: the socket's Origin must match the Host it connects to.
        return f"{self.server.http}{path}"

    def page(self, *, width: int = 1100, height: int = 760, **context: Any) -> Page:
        ctx = self.browser.new_context(viewport={"width": width, "height": height}, **context)
        self.contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        return page

    def _console(self, message: Any) -> None:
        # The pages must live within their own Content-Security-Policy.
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def open_room(self, room: str, *, user: str | None = None, **context: Any) -> Page:
        """A page in `room`, logged in as `user` through the login page (or anonymous)."""
        page = self.page(**context)
        if user is None:
            page.goto(self.url(f"/rooms/{room}/"))
        else:
            page.goto(self.url(f"/accounts/login/?next=/rooms/{room}/"))
            page.fill("#id_username", user)
            page.fill("#id_password", PASSWORD)
            page.click("form.login-form button[type=submit]")
            page.wait_for_url(self.url(f"/rooms/{room}/"))
        expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        expect(page.locator("#online-count")).to_contain_text("online")
        return page

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()


def send(page: Page, body: str) -> None:
    """Type a message in the composer and send it with Enter, as a player does."""
    page.fill("#body", body)
    page.press("#body", "Enter")


def messages(page: Page, text: str | None = None) -> Any:
    """The page's shown messages, optionally only those whose body contains `text`."""
    items = page.locator("#messages li.msg")
    return items if text is None else items.filter(has=page.locator(".body", has_text=text))


class SocketPlayer:
    """A player on a plain WebSocket (no browser), for sending from another server process."""

    def __init__(self, server: ServerProcess, token: str) -> None:
        self.url = f"{server.url}?token={token}"
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> SocketPlayer:
        self.ws = self.stack.enter_context(
            connect(self.url, subprotocols=[Subprotocol("chat.json")])
        )
        self.hello = self.expect("hello")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stack.close()

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))

    def recv(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next frame's events (batches unpacked); pings are answered like a browser."""
        while True:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if frame["type"] == "ping":
                self.send({"type": "pong", "n": frame.get("n")})
                continue
            return list(frame["messages"]) if frame["type"] == "batch" else [frame]

    def expect(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for event in self.recv(remaining):
                if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    return event
        raise TimeoutError(f"no {kind} {fields} within {timeout} s")

    def join(self, room: str) -> dict[str, Any]:
        self.send({"type": "join", "room": room})
        return self.expect("joined", room=room)

    def post(self, room: str, body: str) -> dict[str, Any]:
        client_id = uuid.uuid4().hex
        self.send({"type": "message", "room": room, "body": body, "client_id": client_id})
        return self.expect("ack", client_id=client_id)
