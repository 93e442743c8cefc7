"""Who is on a socket: signed tokens, and the handshake gate that checks Origin and token.

Two ways in, as docs/protocol.md states:
- a browser page of this site, with its session cookie: the Origin header must be this
  site's own (the Host it connected to) or one listed in CHAT_ALLOWED_ORIGINS;
- any client with `?token=`, a token from POST /api/token/, signed with Django's signing
  and valid for CHAT_TOKEN_MAX_AGE seconds. Native clients send no Origin and must use one.

A socket with neither a valid token nor an Origin is refused at the handshake, so a
cookie alone never authenticates a socket that no browser same-origin check stood behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.auth import AuthMiddlewareStack
from django.conf import settings
from django.core import signing

from chat import protocol
from monitoring import metrics

logger = logging.getLogger(__name__)

TOKEN_SALT = "chat.socket-token"


@dataclass(frozen=True, slots=True)
class Identity:
    """The user behind a socket; user_id is None for anonymous readers."""

    user_id: int | None
    username: str | None

    @property
    def is_authenticated(self) -> bool:
        return self.user_id is not None


ANONYMOUS = Identity(user_id=None, username=None)


def token_issue(*, user_id: int, username: str) -> str:
    return signing.dumps({"u": user_id, "n": username}, salt=TOKEN_SALT, compress=False)


def token_verify(token: str) -> Identity | None:
    """The identity in a token, or None if it is forged, malformed or expired."""
    try:
        payload = signing.loads(token, salt=TOKEN_SALT, max_age=settings.CHAT_TOKEN_MAX_AGE)
    except signing.BadSignature:  # SignatureExpired is a BadSignature too
        return None
    except Exception:
        return None
    if not isinstance(payload, dict):
        return None
    user_id, username = payload.get("u"), payload.get("n")
    if not isinstance(user_id, int) or isinstance(user_id, bool) or not isinstance(username, str):
        return None
    return Identity(user_id=user_id, username=username)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def origin_allowed(origin: str, host: str | None) -> bool:
    """Same-origin (Origin's host:port equals the Host header) or explicitly allowed."""
    if origin in settings.CHAT_ALLOWED_ORIGINS:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return host is not None and parts.netloc.lower() == host.lower()


class SocketGate:
    """ASGI middleware for /ws/: refuse foreign origins, resolve tokens, then session auth."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session_auth: Any = AuthMiddlewareStack(inner)

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # A plain function that returns the awaitable it chose, for the server to await: an
        # open socket keeps no frame of the gate (nor the query it parsed) for its lifetime.
        if scope["type"] != "websocket":
            return self.inner(scope, receive, send)
        origin = _header(scope, b"origin")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        token = query.get("token", [None])[0]

        if origin is not None and not origin_allowed(origin, _header(scope, b"host")):
            return _refuse(receive, send, "origin")
        if token is not None:
            identity = token_verify(token)
            if identity is None:
                return _accept_and_close(
                    scope,
                    receive,
                    send,
                    protocol.error(protocol.ErrorCode.AUTH_REQUIRED, "invalid or expired token"),
                    protocol.CloseCode.UNAUTHORIZED,
                )
            return self.inner({**scope, "chat_identity": identity}, receive, send)
        if origin is None:
            # No browser vouched for this socket: a cookie must not be enough.
            return _refuse(receive, send, "no_origin_without_token")
        return self.session_auth(scope, receive, send)


async def _refuse(receive: Any, send: Any, reason: str) -> None:
    """Refuse at the handshake: the client sees HTTP 403."""
    metrics.REJECTED.labels(reason).inc()
    message = await receive()
    if message["type"] == "websocket.connect":
        # Before accept, any close becomes an HTTP 403 refusal of the handshake.
        await send({"type": "websocket.close", "code": int(protocol.CloseCode.NORMAL)})


async def _accept_and_close(
    scope: dict[str, Any], receive: Any, send: Any, frame: protocol.Frame, code: protocol.CloseCode
) -> None:
    """Accept only to say why, then close: browsers cannot read a refused handshake."""
    metrics.REJECTED.labels("bad_token").inc()
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    fmt, subprotocol = protocol.select_subprotocol(scope.get("subprotocols") or ())
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    await send(protocol.send_event(frame, fmt))
    await send({"type": "websocket.close", "code": int(code)})
