"""static/chat/client.js on its own, in Chromium, against a scripted socket.

No server here: the page and the module are served from disk, WebSocket is replaced by a
fake the test drives frame by frame, and timers are recorded instead of waited for, so
the backoff schedule, close-code rules and resume logic are checked exactly and at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route

pytestmark = [pytest.mark.browser]

STATIC = Path(__file__).resolve().parents[2] / "static"
ORIGIN = "http://chat.test"

# A WebSocket the test drives, and timers that only record what they were asked to do.
HARNESS = """
<!doctype html><meta charset="utf-8"><title>client.js</title>
<script type="module">
class FakeSocket {
  static OPEN = 1;
  static all = [];
  constructor(url, protocols) {
    Object.assign(this, { url, protocols, readyState: 0, sent: [] });
    FakeSocket.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code) { this.readyState = 3; this.closedWith = code; }
  open() { this.readyState = 1; this.onopen?.(); }
  receive(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code, reason = "") { this.readyState = 3; this.onclose?.({ code, reason }); }
}
const timers = [];
window.WebSocket = FakeSocket;
window.setTimeout = (fn, delay) => timers.push({ fn, delay });
window.clearTimeout = () => {};
window.setInterval = () => 0;
window.clearInterval = () => {};
const { ChatClient, retryHint } = await import("/static/chat/client.js");
window.harness = {
  FakeSocket, timers, ChatClient, retryHint,
  socket: () => FakeSocket.all.at(-1),
  // Run the one pending timer (the scheduled reconnect) and return its delay.
  fire() { const t = timers.shift(); t.fn(); return t.delay; },
  record(client) {
    const events = [];
    for (const type of ["state", "message", "ack", "joined", "terminated", "failed", "delete"]) {
      client.addEventListener(type, (e) => events.push([type, e.detail]));
    }
    return events;
  },
};
document.title = "ready";
</script>
"""


def _serve(route: Route) -> None:
    path = route.request.url.removeprefix(ORIGIN)
    if path.startswith("/static/"):
        file = STATIC / path.removeprefix("/static/")
        route.fulfill(path=file, content_type="text/javascript")
    else:
        route.fulfill(body=HARNESS, content_type="text/html")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.route(f"{ORIGIN}/**", _serve)
    page.goto(f"{ORIGIN}/")
    page.wait_for_function("document.title === 'ready'")
    yield page
    context.close()


def run(page: Page, script: str) -> Any:
    """Evaluate an async function body with `h` bound to the harness."""
    return page.evaluate(f"async () => {{ const h = window.harness; {script} }}")


def test_backoff_doubles_from_half_a_second_up_to_a_cap_of_twenty(page: Page) -> None:
    """With the jitter at its top, failed attempts wait 0.5, 1, 2, 4 ... seconds, never
    more than 20."""
    delays = run(
        page,
        """
        Math.random = () => 1;
        const client = new h.ChatClient({ url: "ws://chat.test/ws/chat/" });
        client.connect();
        const delays = [];
        for (let i = 0; i < 8; i++) { h.socket().drop(1006); delays.push(h.fire()); }
        return [delays, client.state];
        """,
    )
    assert delays == [[500, 1000, 2000, 4000, 8000, 16000, 20000, 20000], "reconnecting"]


def test_jitter_spreads_each_wait_over_the_whole_step(page: Page) -> None:
    """Full jitter: the wait is a random fraction of the step, down to no wait at all."""
    delays = run(
        page,
        """
        const client = new h.ChatClient();
        client.connect();
        const delays = [];
        for (const r of [0, 0.25, 0.5]) {
          Math.random = () => r;
          h.socket().drop(1006);
          delays.push(h.fire());
        }
        return delays;
        """,
    )
    assert delays == [0, 250, 1000]


@pytest.mark.parametrize(("code", "why"), [(4001, "unauthorized"), (4003, "banned")])
def test_unauthorized_and_banned_closes_end_the_session(page: Page, code: int, why: str) -> None:
    """After 4001 or 4003 the client does not reconnect and says why."""
    result = run(
        page,
        f"""
        const client = new h.ChatClient();
        const events = h.record(client);
        client.connect();
        h.socket().open();
        h.socket().receive({{ type: "hello", user: "alice", heartbeat_ms: 30000 }});
        h.socket().drop({code});
        return [h.timers.length, client.state, events.at(-1)];
        """,
    )
    assert result == [
        0,
        "disconnected",
        ["terminated", {"code": code, "reason": "", "why": why, "expires_ms": None}],
    ]


@pytest.mark.parametrize("code", [1001, 1006, 1012, 1013, 4008, 4009, 4010, 4013])
def test_other_closes_reconnect(page: Page, code: int) -> None:
    """Going away, restarts, slow consumer, heartbeat: all mean 'come back with since'."""
    scheduled = run(
        page,
        f"""
        const client = new h.ChatClient();
        client.connect();
        h.socket().drop({code});
        return h.timers.length;
        """,
    )
    assert scheduled == 1


def test_a_retry_hint_in_the_close_reason_is_honoured(page: Page) -> None:
    """A close reason carrying {"retry_ms": N} makes the client wait at least N ms."""
    result = run(
        page,
        """
        Math.random = () => 0;
        const client = new h.ChatClient();
        client.connect();
        h.socket().drop(4013, 'try later {"retry_ms": 7000}');
        return [h.fire(), h.retryHint("no hint"), h.retryHint('{"retry_ms": "x"}')];
        """,
    )
    assert result == [7000, None, None]


def test_resume_with_since_resend_with_the_same_client_id_and_no_duplicates(
    page: Page,
) -> None:
    """Pings are answered with their n, batches unpacked in order; after a drop the room is
    re-joined with the last id seen, the unacked message is resent with its client_id, and
    a message seen before is not reported again."""
    result = run(
        page,
        """
        Math.random = () => 0;
        const client = new h.ChatClient();
        const events = h.record(client);
        client.join("final");
        client.connect();
        const one = h.socket();
        one.open();
        one.receive({ type: "hello", user: "alice", moderator: false, heartbeat_ms: 30000 });
        const m = (id, user = "bob", extra = {}) =>
          ({ type: "message", room: "final", id, user, body: `m${id}`, ts: id, ...extra });
        one.receive({ type: "joined", room: "final", history: [m(5)], online: 2, more: true });
        const clientId = client.post("final", "gg");
        one.receive({ type: "ping", n: 7 });
        one.receive({ type: "batch", messages: [m(6), m(7)] });
        one.drop(1006);
        h.fire();
        const two = h.socket();
        two.open();
        two.receive({ type: "hello", user: "alice", heartbeat_ms: 30000 });
        two.receive({ type: "joined", room: "final", history: [m(8)], online: 2, more: true });
        two.receive(m(8));  // the same message again, live
        two.receive({ type: "ack", room: "final", client_id: clientId, id: 9, ts: 9,
                      duplicate: true });
        return {
          first: one.sent, second: two.sent, clientId, outbox: client.outbox.size,
          messages: events.filter(([t]) => t === "message").map(([, f]) => f.id),
          states: events.filter(([t]) => t === "state").map(([, s]) => s.state),
        };
        """,
    )
    client_id = result["clientId"]
    assert result["first"] == [
        {"type": "join", "room": "final"},
        {"type": "message", "room": "final", "body": "gg", "client_id": client_id},
        {"type": "pong", "n": 7},
    ]
    assert result["second"] == [
        {"type": "join", "room": "final", "since": 7},
        {"type": "message", "room": "final", "body": "gg", "client_id": client_id},
    ]
    assert result["messages"] == [6, 7]
    assert result["outbox"] == 0
    assert result["states"] == ["connecting", "connected", "reconnecting", "connected"]


def test_own_message_in_recovered_history_is_not_resent(page: Page) -> None:
    """If the message got through before the drop, the replay shows it and the outbox lets
    it go instead of resending it."""
    second = run(
        page,
        """
        const client = new h.ChatClient();
        client.join("final");
        client.connect();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "alice", heartbeat_ms: 30000 });
        h.socket().receive({ type: "joined", room: "final", history: [], online: 1 });
        const clientId = client.post("final", "gg");
        h.socket().drop(1006);
        h.fire();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "alice", heartbeat_ms: 30000 });
        h.socket().receive({ type: "joined", room: "final", online: 1, history: [
          { type: "message", room: "final", id: 1, user: "alice", body: "gg", ts: 1,
            client_id: clientId },
        ] });
        return h.socket().sent;
        """,
    )
    assert second == [{"type": "join", "room": "final", "since": 0}]


def test_a_refused_message_leaves_the_outbox_and_is_reported(page: Page) -> None:
    """An error naming a queued message's client_id (too long, banned, rate limited...)
    drops it from the outbox and tells the page; it is not resent on reconnect."""
    result = run(
        page,
        """
        const client = new h.ChatClient();
        const events = h.record(client);
        client.join("final");
        client.connect();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "alice", heartbeat_ms: 30000 });
        h.socket().receive({ type: "joined", room: "final", history: [], online: 1 });
        const clientId = client.post("final", "spam");
        h.socket().receive({ type: "error", code: "rate_limited", detail: "slow down",
                             ref: clientId });
        const failed = events.find(([t]) => t === "failed")[1];
        return [client.outbox.size, failed.code, failed.client_id === clientId];
        """,
    )
    assert result == [0, "rate_limited", True]


CONNECTED = """
    const client = new h.ChatClient();
    const events = h.record(client);
    for (const room of ["final", "lobby"]) client.join(room);
    client.connect();
    const hello = () => {
      h.socket().open();
      h.socket().receive({ type: "hello", user: "mod", moderator: true, heartbeat_ms: 30000 });
      for (const room of ["final", "lobby"]) {
        if (h.socket().sent.some((f) => f.type === "join" && f.room === room)) {
          h.socket().receive({ type: "joined", room, history: [], online: 1, more: false });
        }
      }
    };
    const m = (id) =>
      ({ type: "message", room: "final", id, user: "bob", body: `m${id}`, ts: id });
    hello();
"""


def test_duplicates_are_found_by_id_not_by_order(page: Page) -> None:
    """A lower id arriving after a higher one (two server processes) is still shown; a
    repeat of either is not; `since` is the highest id."""
    result = run(
        page,
        CONNECTED
        + """
        for (const id of [10, 9, 10, 9]) h.socket().receive(m(id));
        h.socket().drop(1006);
        Math.random = () => 0;
        h.fire();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "mod", heartbeat_ms: 30000 });
        return [events.filter(([t]) => t === "message").map(([, f]) => f.id), h.socket().sent];
        """,
    )
    assert result == [
        [10, 9],
        [
            {"type": "join", "room": "final", "since": 10},
            {"type": "join", "room": "lobby", "since": 0},
        ],
    ]


def test_a_restarting_server_sets_the_wait_without_growing_the_backoff(page: Page) -> None:
    """`reconnect {retry_ms}` then close 4012: come back after retry_ms, with the backoff
    where it was."""
    delays = run(
        page,
        CONNECTED
        + """
        Math.random = () => 0;
        h.socket().receive({ type: "reconnect", retry_ms: 3143 });
        h.socket().drop(4012);
        const first = h.fire();
        Math.random = () => 1;
        h.socket().drop(1006);
        return [first, h.fire()];
        """,
    )
    assert delays == [3143, 500]


def test_resync_rejoins_the_room_on_the_same_socket(page: Page) -> None:
    """After a broker outage the server asks for a re-join from an id it names (or the
    client's own); the client re-joins on the same socket and shows only what it missed."""
    sent = run(
        page,
        CONNECTED
        + """
        for (const id of [4, 7]) h.socket().receive(m(id));
        h.socket().receive({ type: "resync", room: "final", since: 3 });
        const first = h.socket().sent.at(-1);
        h.socket().receive({ type: "joined", room: "final", online: 1, more: true,
                             history: [m(4), m(5), m(7)] });
        h.socket().receive({ type: "resync", room: "final" });
        return [first, h.socket().sent.at(-1), h.FakeSocket.all.length,
                events.filter(([t]) => t === "message").map(([, f]) => f.id),
                events.filter(([t]) => t === "joined").at(-1)[1].history.map((f) => f.id)];
        """,
    )
    assert sent == [
        {"type": "join", "room": "final", "since": 3},
        {"type": "join", "room": "final", "since": 7},
        1,
        [4, 7],  # live
        [5],  # from the re-join: only the one that was missed
    ]


def test_a_room_the_user_was_removed_from_is_not_rejoined_before_the_timeout_ends(
    page: Page,
) -> None:
    """After `error banned` + `left` for one room, a reconnect re-joins only the others."""
    sent = run(
        page,
        CONNECTED
        + """
        h.socket().receive({ type: "error", code: "banned", detail: "timed out", ref: "final",
                             kind: "timeout", expires_ms: Date.now() + 600000 });
        h.socket().receive({ type: "left", room: "final" });
        h.socket().drop(1006);
        h.fire();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "mod", heartbeat_ms: 30000 });
        return h.socket().sent;
        """,
    )
    assert sent == [{"type": "join", "room": "lobby", "since": 0}]


def test_an_unanswered_command_is_reported_not_resent(page: Page) -> None:
    """A command sent just before a drop may have run: it is reported as unconfirmed and not
    sent again. A command typed while offline was never sent: it goes out after the join."""
    result = run(
        page,
        CONNECTED
        + """
        const inFlight = client.post("final", "/ban mallory");
        h.socket().drop(1006);
        const queued = client.post("final", "/delete 4");
        h.fire();
        hello();
        const failed = events.filter(([t]) => t === "failed").map(([, f]) => [f.code, f.client_id]);
        return [failed, [inFlight], h.socket().sent.filter((f) => f.type === "message")
                .map((f) => f.body)];
        """,
    )
    failed, (in_flight,), resent = result
    assert failed == [["unconfirmed", in_flight]]
    assert resent == ["/delete 4"]


def test_messages_deleted_while_away_are_dropped_on_rejoin(page: Page) -> None:
    """`joined.deleted` after a re-join with since: the client reports each as deleted."""
    deleted = run(
        page,
        CONNECTED
        + """
        for (const id of [4, 5, 6]) h.socket().receive(m(id));
        h.socket().drop(1006);
        h.fire();
        h.socket().open();
        h.socket().receive({ type: "hello", user: "me", moderator: false });
        h.socket().receive({ type: "joined", room: "final", online: 1, more: true,
                             history: [m(8)], deleted: [5] });
        return events.filter(([t]) => t === "delete").map(([, f]) => [f.room, f.id]);
        """,
    )
    assert deleted == [["final", 5]]


def test_a_global_timeout_comes_back_when_it_ends_but_a_ban_does_not(page: Page) -> None:
    """`error banned` with expires_ms then 4003: the client waits out the timeout and
    reconnects; without expires_ms (a ban) it stays disconnected."""
    result = run(
        page,
        CONNECTED
        + """
        const until = Date.now() + 60000;
        h.socket().receive({ type: "error", code: "banned", detail: "timed out",
                             kind: "timeout", expires_ms: until });
        h.socket().drop(4003);
        const terminated = events.filter(([t]) => t === "terminated").at(-1)[1];
        const wait = h.fire();
        return [terminated.expires_ms === until, wait > 59000 && wait < 62000,
                h.FakeSocket.all.length];
        """,
    )
    assert result == [True, True, 2]


def test_only_known_slash_words_are_commands(page: Page) -> None:
    assert run(
        page,
        """
        const { isCommand } = await import("/static/chat/client.js");
        return ["/delete 4", "/BAN bob", "/clear", "/shrug", "/deleted", "gg /ban"]
          .map(isCommand);
        """,
    ) == [True, True, True, False, False, False]
