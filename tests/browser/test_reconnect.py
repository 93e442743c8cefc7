"""The page rides out a server that dies: it says so, comes back, and misses nothing."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import FAST
from tests.browser.pages import Chat, SocketPlayer, messages, send
from tests.support import ServerProcess

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def restart(server_env: dict[str, str]) -> Iterator[Callable[[ServerProcess], ServerProcess]]:
    """Start a new server process on a dead one's port; stopped after the test."""
    started: list[ServerProcess] = []

    def start(dead: ServerProcess) -> ServerProcess:
        server = ServerProcess(env={**server_env, **FAST}, port=dead.port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_page_reconnects_after_its_server_is_killed_and_misses_nothing(
    chat: Chat,
    servers: Callable[..., ServerProcess],
    restart: Callable[[ServerProcess], ServerProcess],
    make_user: Any,
    make_room: Any,
) -> None:
    """SIGKILL the page's server: the page shows 'reconnecting', keeps what its player types,
    and once the server is back on the same port shows every message sent meanwhile (from
    a second process sharing Redis) exactly once, and delivers its own exactly once."""
    make_room("final")
    make_user("alice")
    _, bob_token = make_user("bob")
    other = servers("daphne", **FAST)
    alice = chat.open_room("final", user="alice")
    with SocketPlayer(other, bob_token) as bob:
        bob.join("final")
        bob.post("final", "before the crash")
        expect(messages(alice, "before the crash")).to_have_count(1)

        chat.server.kill()
        conn = alice.locator("#conn")
        expect(conn).to_have_attribute("data-state", "reconnecting")
        expect(conn).to_have_text(re.compile("reconnecting", re.I))
        expect(alice.locator("#banner")).to_contain_text("Reconnecting")

        missed = ["while you were away 1", "while you were away 2"]
        for body in missed:
            bob.post("final", body)
        send(alice, "typed while offline")
        expect(messages(alice, "typed while offline")).to_have_class(re.compile(r"\bpending\b"))

        restart(chat.server)
        # Full jitter under a cap of 20 s: back within one capped step of the server.
        expect(conn).to_have_attribute("data-state", "connected", timeout=45_000)
        expect(alice.locator("#banner")).to_be_hidden()
        for body in [*missed, "typed while offline"]:
            expect(messages(alice, body)).to_have_count(1)
        expect(alice.locator("#messages li.pending")).to_have_count(0)
        expect(alice.locator("#messages .body")).to_have_text(
            ["before the crash", *missed, "typed while offline"]
        )
        bob.expect("message", body="typed while offline")
        alice.wait_for_timeout(300)  # a duplicate would arrive right behind the original
        expect(messages(alice)).to_have_count(4)
