"""Writes: every state change in chat, and the only place that broadcasts.

Each action validates its untrusted input first, writes in one transaction and publishes
to the room only after the transaction commits, so no socket ever sees a message that
was rolled back. Actions are synchronous ORM code with keyword-only arguments; consumers
call them through database_sync_to_async, admin and commands call them directly.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from chat import hub, protocol, selectors
from chat.models import Message, Room
from chat.protocol import ErrorCode
from chat.selectors import RoomInfo, to_ms


class ChatError(Exception):
    """A refused action. Consumers answer it with an `error` frame of the same code."""

    def __init__(self, code: ErrorCode, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra


@dataclass(frozen=True, slots=True)
class PostResult:
    frame: protocol.Frame
    duplicate: bool


# Control characters other than newline and tab never reach storage, nor do the bidi
# controls that can make a message render as something other than what was typed.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _kept(ch: str) -> bool:
    if ch in "\n\t":
        return True
    return ch not in _BIDI_CONTROLS and unicodedata.category(ch) not in _DROPPED_CATEGORIES


def text_normalize(body: str) -> str:
    """NFC and trimmed, without controls, bidi controls, surrogates, private-use or
    unassigned code points."""
    body = unicodedata.normalize("NFC", body)
    return "".join(ch for ch in body if _kept(ch)).strip()


def room_enter(*, slug: str, user_id: int | None) -> RoomInfo:
    """The room a socket may join, or ChatError saying why not."""
    room = selectors.room_get(slug=slug)
    if room is None:
        raise ChatError(ErrorCode.UNKNOWN_ROOM, f"no room {slug!r}")
    if not room.is_public:
        if user_id is None:
            raise ChatError(ErrorCode.AUTH_REQUIRED, "this room is for members; sign in first")
        if not selectors.room_is_member(room_id=room.id, user_id=user_id):
            raise ChatError(ErrorCode.FORBIDDEN, "this room is for members only")
    return room


def message_post(
    *, user_id: int, room: RoomInfo, body: str, client_id: str | None = None
) -> PostResult:
    """Store a message and publish it to the room after commit.

    A resend with a `client_id` this user already used returns the original message with
    duplicate=True and publishes nothing. If publishing fails the message is still stored;
    the caller gets ChatError(UNAVAILABLE) and members recover it with `since`.
    """
    if room.archived:
        raise ChatError(ErrorCode.ROOM_ARCHIVED, "this room is archived and read-only")
    body = text_normalize(body)
    if not body:
        raise ChatError(ErrorCode.EMPTY, "the message is empty")
    limit = settings.CHAT_MAX_MESSAGE_LENGTH
    if len(body) > limit:
        raise ChatError(ErrorCode.TOO_LONG, f"messages are at most {limit} characters", limit=limit)
    if client_id is not None:
        original = _message_by_client_id(user_id=user_id, client_id=client_id, room=room)
        if original is not None:
            return PostResult(frame=original, duplicate=True)
    author = (
        get_user_model()
        .objects.filter(pk=user_id, is_active=True)
        .values_list("username", flat=True)
        .first()
    )
    if author is None:
        raise ChatError(ErrorCode.AUTH_REQUIRED, "this account cannot post")
    username = author
    created = timezone.now()
    try:
        with transaction.atomic():
            message = Message.objects.create(
                room_id=room.id, author_id=user_id, body=body, created=created, client_id=client_id
            )
            frame = protocol.message(
                room=room.slug,
                id=message.pk,
                user=username,
                body=body,
                ts=to_ms(created),
                client_id=client_id,
            )
            transaction.on_commit(partial(_publish, room.id, frame), robust=False)
    except IntegrityError:
        # Two resends raced; the first one stored the message.
        if client_id is None:
            raise
        original = _message_by_client_id(user_id=user_id, client_id=client_id, room=room)
        if original is None:
            raise
        return PostResult(frame=original, duplicate=True)
    except _PublishFailed:
        raise ChatError(
            ErrorCode.UNAVAILABLE,
            "message stored, but live delivery is down; members will get it on reconnect",
            id=frame["id"],
        ) from None
    return PostResult(frame=frame, duplicate=False)


def _message_by_client_id(*, user_id: int, client_id: str, room: RoomInfo) -> protocol.Frame | None:
    row = (
        Message.objects.filter(author_id=user_id, client_id=client_id)
        .values_list("id", "author__username", "body", "created", "room__slug")
        .first()
    )
    if row is None:
        return None
    pk, username, body, created, room_slug = row
    return protocol.message(
        room=room_slug, id=pk, user=username, body=body, ts=to_ms(created), client_id=client_id
    )


class _PublishFailed(Exception):
    pass


def _publish(room_id: int, frame: protocol.Frame) -> None:
    try:
        async_to_sync(hub.publish)(room_id, frame)
    except Exception as exc:
        raise _PublishFailed from exc


async def typing_publish(*, room: RoomInfo, username: str) -> None:
    """Tell the room's other members that `username` is typing. Never stored."""
    await hub.publish(room.id, protocol.typing(room=room.slug, user=username))


def room_ensure(*, slug: str, title: str, is_public: bool = True) -> Room:
    """Create the room if it does not exist; never changes an existing one."""
    room, _ = Room.objects.get_or_create(
        slug=slug, defaults={"title": title, "is_public": is_public}
    )
    return room


def user_ensure(*, username: str, password: str, is_staff: bool = False) -> Any:
    """Create the user if missing (with this password); existing users are left as they are."""
    user_model = get_user_model()
    user = user_model.objects.filter(username=username).first()
    if user is None:
        user = user_model.objects.create_user(
            username=username, password=password, is_staff=is_staff, is_superuser=is_staff
        )
    return user
