"""The tutorial consumer, taught protocol v1's join/message/ack/ping so the load test can drive it.

Per message: one `group_send` to a group whose members are sockets, so the layer queues it
once per member; then each member's consumer dispatches it (with Channels' thread hop) and
encodes its own JSON copy. This is the shape docs/benchmarks.md compares the hub against.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.core import signing

TOKEN_SALT = "chat.socket-token"  # the product's (chat.auth.TOKEN_SALT), so its tokens verify
TOKEN_MAX_AGE = 24 * 3600

_ids = itertools.count(1)


def _group(room: str) -> str:
    return f"chat_{room}"


class NaiveChatConsumer(AsyncWebsocketConsumer):
    username: str | None = None

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        token = query.get("token", [""])[0]
        try:
            payload = signing.loads(token, salt=TOKEN_SALT, max_age=TOKEN_MAX_AGE)
        except signing.BadSignature:
            await self.close(code=4001)
            return
        self.username = str(payload.get("n"))
        self.rooms: set[str] = set()
        subprotocol = "chat.json" if "chat.json" in self.scope.get("subprotocols", []) else None
        await self.accept(subprotocol=subprotocol)
        hello = {"type": "hello", "version": 1, "user": self.username}
        await self.send(text_data=json.dumps(hello))

    async def disconnect(self, code: int) -> None:
        for room in getattr(self, "rooms", ()):
            await self.channel_layer.group_discard(_group(room), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        data: dict[str, Any] = json.loads(text_data or "{}")
        kind = data.get("type")
        room = str(data.get("room", ""))
        if kind == "join":
            await self.channel_layer.group_add(_group(room), self.channel_name)
            self.rooms.add(room)
            frame = {"type": "joined", "room": room, "history": [], "online": 0, "gap": False}
            await self.send(text_data=json.dumps(frame))
        elif kind == "message" and room in self.rooms:
            ts = int(time.time() * 1000)
            event = {
                "type": "chat.message",
                "room": room,
                "id": next(_ids),
                "user": self.username,
                "body": data.get("body", ""),
                "ts": ts,
                "client_id": data.get("client_id"),
            }
            await self.channel_layer.group_send(_group(room), event)
            ack = {"type": "ack", "room": room, "client_id": event["client_id"]}
            await self.send(text_data=json.dumps({**ack, "id": event["id"], "ts": ts}))
        elif kind == "ping":
            await self.send(text_data=json.dumps({"type": "pong", "n": data.get("n")}))

    async def chat_message(self, event: dict[str, Any]) -> None:
        frame = {key: value for key, value in event.items() if key != "type"}
        await self.send(text_data=json.dumps({"type": "message", **frame}))
