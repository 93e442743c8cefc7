"""WebSocket routes: exact paths to socket applications.

Channels' URLRouter awaits the matched application inside a coroutine of its own, so every
open socket would keep that frame (and the scope copy it holds) alive for its whole life; at
thousands of sockets per process that is memory for nothing. The chat has one socket path,
so this router only looks the path up and hands back the application's own awaitable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chat import protocol
from chat.consumers import ChatConsumer


def chat_socket(scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
    return ChatConsumer()(scope, receive, send)


class SocketRoutes:
    """Route a socket by its exact path; an unknown path is refused at the handshake (403)."""

    def __init__(self, routes: dict[str, Callable[..., Awaitable[None]]]) -> None:
        self.routes = routes

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        path = scope["path"][len(scope.get("root_path", "")) :]
        app = self.routes.get(path)
        if app is None:
            return _not_found(receive, send)
        return app(scope, receive, send)


async def _not_found(receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": int(protocol.CloseCode.NORMAL)})


websocket_routes = SocketRoutes({"/ws/chat/": chat_socket})
