"""Real server processes (Daphne and Uvicorn) sharing rooms through a real Redis."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support import Client

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]


@pytest.fixture(autouse=True)
def _setup_orm_in_async_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests create rows with the ORM from async code; only the servers serve them."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


FAST = {"CHAT_PRESENCE_INTERVAL": "0.2", "CHAT_BATCH_WINDOW_MS": "20"}


async def _post_all(client: Client, room: str, bodies: list[str]) -> None:
    for body in bodies:
        await client.post(room, body, client_id=body)
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "kinds", [("daphne", "daphne"), ("uvicorn", "uvicorn"), ("daphne", "uvicorn")]
)
async def test_every_message_reaches_every_client_once_in_one_order(
    servers: Any, make_user: Any, make_room: Any, kinds: tuple[str, str]
) -> None:
    """Two processes, clients of one room on each, both posting: all see all, once, same order."""
    make_room("final")
    tokens = [make_user(f"p{i}")[1] for i in range(4)]
    one, two = servers(kinds[0], **FAST), servers(kinds[1], **FAST)
    clients = [
        await Client.connect(one.url, token=tokens[0]),
        await Client.connect(one.url, token=tokens[1], fmt="msgpack"),
        await Client.connect(two.url, token=tokens[2], fmt="msgpack"),
        await Client.connect(two.url, token=tokens[3]),
    ]
    for client in clients:
        await client.join("final")
    per_sender = 15
    await asyncio.gather(
        _post_all(clients[0], "final", [f"a{i}" for i in range(per_sender)]),
        _post_all(clients[3], "final", [f"b{i}" for i in range(per_sender)]),
    )
    received = [await c.messages(2 * per_sender) for c in clients]
    orders = [[m["id"] for m in got] for got in received]
    assert all(order == orders[0] for order in orders), "every socket sees one order"
    assert len(set(orders[0])) == 2 * per_sender, "each message exactly once"
    bodies = [m["body"] for m in received[0]]
    assert [b for b in bodies if b[0] == "a"] == [f"a{i}" for i in range(per_sender)]
    assert [b for b in bodies if b[0] == "b"] == [f"b{i}" for i in range(per_sender)]
    for client in clients:
        await client.close()


async def test_client_of_a_killed_process_recovers_everything_with_since(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    """SIGKILL one process; its client reconnects elsewhere and gets what it missed, once."""
    make_room("final")
    (_, t1), (_, t2) = make_user("caster"), make_user("viewer")
    one, two = servers("daphne", **FAST), servers("daphne", **FAST)
    caster = await Client.connect(one.url, token=t1)
    viewer = await Client.connect(two.url, token=t2)
    await caster.join("final")
    await viewer.join("final")
    await caster.post("final", "before")
    seen = await viewer.messages(1)
    two.kill()
    for i in range(5):
        await caster.post("final", f"during{i}")
    await caster.messages(6)
    viewer = await Client.connect(one.url, token=t2)
    joined = await viewer.join("final", since=seen[-1]["id"])
    assert [m["body"] for m in joined["history"]] == [f"during{i}" for i in range(5)]
    await caster.post("final", "after")
    assert [m["body"] for m in await viewer.messages(1)] == ["after"]
    await caster.close()
    await viewer.close()


async def test_online_count_spans_processes(servers: Any, make_user: Any, make_room: Any) -> None:
    """`joined.online` counts members on every process, and members hear when it changes."""
    make_room("final")
    tokens = [make_user(f"fan{i}")[1] for i in range(3)]
    one, two = servers("daphne", **FAST), servers("daphne", **FAST)
    first = await Client.connect(one.url, token=tokens[0])
    assert (await first.join("final"))["online"] == 1
    second = await Client.connect(two.url, token=tokens[1])
    assert (await second.join("final"))["online"] == 2
    third = await Client.connect(two.url, token=tokens[2])
    assert (await third.join("final"))["online"] == 3
    update = await first.expect("presence", timeout=5)
    while update["online"] != 3:
        update = await first.expect("presence", timeout=5)
    await third.close()
    update = await first.expect("presence", timeout=5)
    while update["online"] != 2:
        update = await first.expect("presence", timeout=5)
    await first.close()
    await second.close()


async def test_single_daphne_without_redis_serves_the_embedded_defaults(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    """`make run`'s shape: one Daphne, in-memory layer; JSON and msgpack clients talk."""
    make_room("lobby")
    (_, t1), (_, t2) = make_user("a"), make_user("b")
    server = servers("daphne", REDIS_URL="")
    a = await Client.connect(server.url, token=t1)
    b = await Client.connect(server.url, token=t2, fmt="msgpack")
    await a.join("lobby")
    await b.join("lobby")
    await b.post("lobby", "hello from msgpack", client_id="x1")
    ack = await b.expect("ack")
    got = await a.messages(1)
    assert got[0]["id"] == ack["id"] and got[0]["body"] == "hello from msgpack"
    await a.close()
    await b.close()


def _post_json(url: str, payload: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_token_api_issues_tokens_that_open_sockets(
    servers: Any, make_user: Any, make_room: Any
) -> None:
    """POST /api/token/: 200 with a working token, 401 for wrong passwords, 400 for junk."""
    make_user("alice", password="correct horse")
    server = servers("daphne", REDIS_URL="")
    url = f"{server.http}/api/token/"
    loop = asyncio.get_running_loop()
    status, body = await loop.run_in_executor(
        None, _post_json, url, {"username": "alice", "password": "correct horse"}
    )
    assert status == 200 and body["user"] == "alice" and body["expires_in"] > 0
    client = await Client.connect(server.url, token=body["token"])
    assert client.hello is not None and client.hello["user"] == "alice"
    await client.close()
    status, body = await loop.run_in_executor(
        None, _post_json, url, {"username": "alice", "password": "wrong"}
    )
    assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = await loop.run_in_executor(None, _post_json, url, ["not", "an", "object"])
    assert (status, body["error"]) == (400, "bad_request")
    status, body = await loop.run_in_executor(None, _post_json, url, {"username": "alice"})
    assert (status, body["error"]) == (400, "bad_request")
