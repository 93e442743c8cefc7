"""Who may open a socket, and what each refusal looks like, against a real Daphne process.

docs/protocol.md ("The handshake rules") is the contract: a foreign Origin, or a cookie with
no Origin, is refused at the handshake (HTTP 403); a bad token is accepted only to be told
why (`error auth_required`, close 4001); a banned user gets `error banned` and 4003.
"""

from __future__ import annotations

import asyncio
import functools
import http.cookiejar
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.core import signing

from chat import services
from chat.auth import TOKEN_SALT
from tests.reliability.harness import RawSocket
from tests.support import Client, ServerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]


@pytest.fixture
def server(chat_server: Callable[..., ServerProcess], make_room: Callable[..., Any]) -> Any:
    make_room("final")
    return chat_server("daphne")


async def _refused_with(url: str, **kwargs: Any) -> tuple[dict[str, Any] | None, int | None]:
    """Connect, read until the close; returns (the error frame, the close code)."""
    ws = await websockets.connect(url, **kwargs)
    error = None
    try:
        while True:
            frame = json.loads(await ws.recv())
            assert frame["type"] != "hello", "this socket must not be served"
            if frame["type"] == "error":
                error = frame
    except websockets.ConnectionClosed:
        pass
    return error, ws.close_code


async def _status(url: str, **kwargs: Any) -> int:
    """The HTTP status of a handshake the server refuses."""
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url, **kwargs)
    return info.value.response.status_code


def _expired_token(user_id: int, username: str) -> str:
    """A genuine token, signed two token lifetimes ago."""

    class Past(signing.TimestampSigner):
        def timestamp(self) -> str:
            return signing.b62_encode(int(time.time()) - 2 * settings.CHAT_TOKEN_MAX_AGE)

    return Past(salt=TOKEN_SALT).sign_object({"u": user_id, "n": username}, compress=False)


async def test_forged_tampered_and_expired_tokens_get_4001(
    server: ServerProcess, make_user: Callable[..., Any]
) -> None:
    """Forged, tampered and expired tokens: accepted only to say `auth_required`, then 4001."""
    user, token = make_user("alice")
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    # What someone without the server's secret could make: well-formed, wrongly signed.
    forged = signing.dumps({"u": user.pk, "n": "alice"}, key="not-the-secret", salt=TOKEN_SALT)
    for bad in ("nonsense", tampered, forged, _expired_token(user.pk, "alice")):
        error, code = await _refused_with(f"{server.url}?token={urllib.parse.quote(bad)}")
        assert code == 4001, bad
        assert error is not None and error["code"] == "auth_required"
    # The same user's valid token works, from a native client that sends no Origin.
    client = await Client.connect(server.url, token=token)
    assert client.hello is not None and client.hello["user"] == "alice"
    await client.close()


async def test_origin_rules_at_the_handshake(
    server: ServerProcess, make_user: Callable[..., Any]
) -> None:
    """A foreign Origin is refused even with a valid token; no Origin and no token is refused;
    a same-origin page without a session is an anonymous reader who cannot post."""
    _, token = make_user("alice")
    own = f"http://127.0.0.1:{server.port}"
    assert await _status(f"{server.url}?token={token}", origin="http://evil.example") == 403
    assert await _status(server.url, origin="http://evil.example") == 403
    assert await _status(server.url, origin="null") == 403
    assert await _status(server.url) == 403  # no Origin, no token
    anonymous = await Client.connect(server.url, origin=own)
    assert anonymous.hello is not None and anonymous.hello["user"] is None
    await anonymous.join("final")
    await anonymous.post("final", "hello from nobody", client_id="a1")
    error = await anonymous.expect("error")
    assert (error["code"], error["ref"]) == ("auth_required", "a1")
    await anonymous.close()
    # Header smuggling on the upgrade (CVE-2026-44546) is a 400 before any of it.
    raw = await RawSocket.connect(server.port, handshake=False)
    await raw.send_raw(
        f"GET /ws/chat/?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "X-Forwarded-For: 1.2.3.4\x0bOrigin: http://evil.example\r\n\r\n".encode("latin-1")
    )
    while b"\r\n" not in raw.buf and not raw.eof:
        await raw.fill(5)
    assert raw.buf.startswith(b"HTTP/1.1 400"), raw.buf[:80]
    raw.close()


class _Browser:
    """Just enough of a browser for Django's login and logout: cookies and CSRF tokens."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=10) as response:
            return str(response.read().decode())

    def post(self, path: str, fields: dict[str, str]) -> int:
        data = urllib.parse.urlencode(fields).encode()
        request = urllib.request.Request(
            self.base + path, data=data, headers={"Referer": self.base + path}
        )
        try:
            with self.opener.open(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def login(self, username: str, password: str) -> None:
        page = self.get("/accounts/login/")
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert match, "the login page has a CSRF token"
        fields = {"username": username, "password": password}
        assert self.post("/accounts/login/", {**fields, "csrfmiddlewaretoken": match[1]}) == 200
        assert self.cookie("sessionid"), "logged in"

    def logout(self) -> None:
        csrf = self.cookie("csrftoken")
        assert csrf
        assert self.post("/accounts/logout/", {"csrfmiddlewaretoken": csrf}) == 200


async def test_cookie_needs_its_origin_and_logout_does_not_revoke_tokens(
    server: ServerProcess, make_user: Callable[..., Any]
) -> None:
    """A session cookie opens a socket only with this site's Origin (cross-site socket
    hijacking is refused), logging out ends what the cookie can do, and a token issued before
    the logout keeps working until it expires: tokens are signed, not stored, so nothing
    revokes them (deactivating the account does, see below)."""
    make_user("alice", password="correct horse battery")
    own = f"http://127.0.0.1:{server.port}"
    browser = _Browser(server.http)
    await _in_thread(browser.login, "alice", "correct horse battery")
    token = await _in_thread(_token, server.http, "alice", "correct horse battery")
    cookie = {"Cookie": f"sessionid={browser.cookie('sessionid')}"}
    assert await _status(server.url, additional_headers=cookie) == 403  # no Origin
    assert await _status(server.url, additional_headers=cookie, origin="http://evil.example") == 403
    page = await Client.connect(server.url, additional_headers=cookie, origin=own)
    assert page.hello is not None and page.hello["user"] == "alice"
    await page.close()

    await _in_thread(browser.logout)
    after = await Client.connect(server.url, additional_headers=cookie, origin=own)
    assert after.hello is not None and after.hello["user"] is None, "the session is gone"
    await after.close()
    native = await Client.connect(server.url, token=token)
    assert native.hello is not None and native.hello["user"] == "alice", "the token still works"
    await native.close()


async def test_banned_and_deactivated_users_are_refused(
    server: ServerProcess, make_user: Callable[..., Any], make_room: Callable[..., Any]
) -> None:
    """A globally banned user gets `error banned` and 4003 at connect; a room ban refuses the
    join; a deactivated account gets 4001 at connect, and its open socket can post no more."""
    mod, _ = make_user("mod")
    mod.is_superuser = True
    mod.save()
    banned, banned_token = make_user("troll")
    roomban, roomban_token = make_user("flamer")
    leaving, leaving_token = make_user("leaver")
    await _in_thread(
        services.sanction_apply,
        actor_id=mod.pk,
        target_id=banned.pk,
        kind="ban",
        room_id=None,
        duration_s=None,
        reason="spam",
        via="admin",
    )
    error, code = await _refused_with(f"{server.url}?token={banned_token}")
    assert code == 4003
    assert error is not None and (error["code"], error["reason"]) == ("banned", "spam")

    side = make_room("side")
    await _in_thread(
        services.sanction_apply,
        actor_id=mod.pk,
        target_id=roomban.pk,
        kind="ban",
        room_id=side.pk,
        duration_s=600,
        reason="off topic",
        via="admin",
    )
    client = await Client.connect(server.url, token=roomban_token)
    await client.send({"type": "join", "room": "side"})
    refusal = await client.expect("error")
    assert (refusal["code"], refusal["ref"]) == ("banned", "side")
    assert (await client.join("final"))["room"] == "final", "other rooms stay open"
    await client.close()

    open_socket = await Client.connect(server.url, token=leaving_token)
    await open_socket.join("final")
    leaving.is_active = False
    await _in_thread(leaving.save)
    error, code = await _refused_with(f"{server.url}?token={leaving_token}")
    assert code == 4001
    assert error is not None and error["code"] == "auth_required"
    await open_socket.post("final", "still here?", client_id="late")
    late = await open_socket.expect("error")
    assert (late["code"], late["ref"]) == ("auth_required", "late")
    # Deactivation refuses new sockets and posts; the open socket still reads the room.
    other = await Client.connect(server.url, token=make_user("other")[1])
    await other.join("final")
    await other.post("final", "can you read this", client_id="o1")
    assert [m["body"] for m in await open_socket.messages(1)] == ["can you read this"]
    await other.close()
    await open_socket.close()


async def test_moderator_flag_comes_from_every_source_of_the_permission(
    server: ServerProcess, make_user: Callable[..., Any]
) -> None:
    """`hello.moderator` is true for a superuser, a member of the Moderators group and a user
    given the permission directly, and false for everyone else (checked in one batch)."""
    superuser, super_token = make_user("root")
    superuser.is_superuser = True
    superuser.save()
    grouped, grouped_token = make_user("grouped")
    grouped.groups.add(Group.objects.get(name="Moderators"))
    direct, direct_token = make_user("direct")
    direct.user_permissions.add(Permission.objects.get(codename="moderate"))
    _, plain_token = make_user("plain")
    clients = [
        await Client.connect(server.url, token=t)
        for t in (super_token, grouped_token, direct_token, plain_token)
    ]
    assert [c.hello["moderator"] for c in clients if c.hello] == [True, True, True, False]
    for client in clients:
        await client.close()


async def _in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(function, *args, **kwargs))


def _token(base: str, username: str, password: str) -> str:
    request = urllib.request.Request(
        f"{base}/api/token/",
        data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["token"])
