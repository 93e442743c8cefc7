"""Reads: rooms, history pages and `since` recovery, as wire-ready message frames.

Synchronous ORM code; consumers call it through database_sync_to_async. Every query
here is served by the (room, id) index on Message.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone

from chat import protocol
from chat.models import Message, Room, Sanction

MODERATE_PERMISSION = "chat.moderate"

_MESSAGE_FIELDS = ("id", "author__username", "body", "created", "client_id")


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """What the socket layer needs to know about a room to let someone in."""

    id: int
    slug: str
    title: str
    is_public: bool
    archived: bool
    slow_mode: int
    read_only: bool


_ROOM_FIELDS = ("id", "slug", "title", "is_public", "archived", "slow_mode_seconds", "read_only")


@dataclass(frozen=True, slots=True)
class SanctionInfo:
    """The sanction that keeps a user out: the longest-lasting one if several apply."""

    kind: str
    room_id: int | None
    expires_at: datetime | None
    reason: str

    @property
    def expires_ms(self) -> int | None:
        return to_ms(self.expires_at) if self.expires_at is not None else None


@dataclass(frozen=True, slots=True)
class SocketProfile:
    """What a socket needs to know about its user at connect time."""

    active: bool
    moderator: bool
    banned: SanctionInfo | None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[protocol.Frame]
    more: bool


def to_ms(moment: datetime) -> int:
    """Wire timestamps are integer milliseconds since the epoch, UTC."""
    return int(moment.timestamp() * 1000)


def _frames(
    room_slug: str, rows: list[tuple[int, str, str, datetime, str | None]]
) -> list[protocol.Frame]:
    return [
        protocol.message(
            room=room_slug, id=pk, user=user, body=body, ts=to_ms(created), client_id=client_id
        )
        for pk, user, body, created, client_id in rows
    ]


def room_get(*, slug: str) -> RoomInfo | None:
    row = Room.objects.filter(slug=slug).values_list(*_ROOM_FIELDS).first()
    return RoomInfo(*row) if row else None


def room_get_by_id(*, room_id: int) -> RoomInfo | None:
    row = Room.objects.filter(pk=room_id).values_list(*_ROOM_FIELDS).first()
    return RoomInfo(*row) if row else None


def rooms_by_slug(*, slugs: Collection[str]) -> dict[str, RoomInfo]:
    rows = Room.objects.filter(slug__in=slugs).values_list(*_ROOM_FIELDS)
    return {row[1]: RoomInfo(*row) for row in rows}


def rooms_by_id(*, room_ids: Collection[int]) -> dict[int, RoomInfo]:
    rows = Room.objects.filter(pk__in=room_ids).values_list(*_ROOM_FIELDS)
    return {row[0]: RoomInfo(*row) for row in rows}


def users_active(*, user_ids: Collection[int]) -> dict[int, Any]:
    """The active users among these ids, by id."""
    return {
        user.pk: user for user in get_user_model().objects.filter(pk__in=user_ids, is_active=True)
    }


def room_members_among(*, room_id: int, user_ids: Collection[int]) -> set[int]:
    """Which of these users are members of the room."""
    through = Room.members.through.objects.filter(room_id=room_id, user_id__in=user_ids)
    return set(through.values_list("user_id", flat=True))


def room_list_visible(*, user_id: int | None) -> list[RoomInfo]:
    """Rooms a user may join: every public one plus the members-only rooms they belong to."""
    rooms = Room.objects.filter(archived=False)
    visible = Q(is_public=True)
    if user_id is not None:
        visible |= Q(members__id=user_id)
    rows = rooms.filter(visible).distinct().order_by("slug").values_list(*_ROOM_FIELDS)
    return [RoomInfo(*row) for row in rows]


def _live(room_id: int) -> QuerySet[Message]:
    return Message.objects.filter(room_id=room_id, deleted_at__isnull=True)


def message_recent(*, room: RoomInfo, limit: int | None = None) -> HistoryPage:
    """The newest `limit` messages, oldest first; `more` says whether older ones exist."""
    limit = settings.CHAT_HISTORY_LIMIT if limit is None else limit
    return message_page(room=room, before=None, limit=limit)


def message_page(*, room: RoomInfo, before: int | None, limit: int) -> HistoryPage:
    """Up to `limit` messages older than `before` (or the newest), oldest first."""
    if limit <= 0:
        return HistoryPage(messages=[], more=_live(room.id).exists())
    queryset = _live(room.id)
    if before is not None:
        queryset = queryset.filter(id__lt=before)
    rows = list(queryset.order_by("-id").values_list(*_MESSAGE_FIELDS)[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    rows.reverse()
    return HistoryPage(messages=_frames(room.slug, rows), more=more)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a client that saw everything up to `since` needs to catch up."""

    messages: list[protocol.Frame]
    gap: bool
    deleted: list[int]


def message_since(*, room: RoomInfo, since: int) -> Recovery:
    """Every message after `since`, oldest first, up to the recovery limit, and the ids of
    messages at or before `since` (within the same limit) deleted since they were posted.

    `gap`: past the limit the newest messages are returned and the client pages back
    through `history` for the rest. `deleted` lets a client that was away drop what a
    moderator removed meanwhile.
    """
    limit = settings.CHAT_RECOVERY_LIMIT
    rows = list(
        _live(room.id)
        .filter(id__gt=since)
        .order_by("-id")
        .values_list(*_MESSAGE_FIELDS)[: limit + 1]
    )
    gap = len(rows) > limit
    rows = rows[:limit]
    rows.reverse()
    seen = (
        Message.objects.filter(room_id=room.id, id__lte=since)
        .order_by("-id")
        .values_list("id", "deleted_at")[:limit]
    )
    deleted = sorted(pk for pk, deleted_at in seen if deleted_at is not None)
    return Recovery(messages=_frames(room.slug, rows), gap=gap, deleted=deleted)


def sanctions_active_in(
    *, pairs: Collection[tuple[int, int]]
) -> dict[tuple[int, int], SanctionInfo]:
    """The ban or timeout keeping each (user id, room id) out of that room, a room's own or
    one for every room, in one query; pairs with none are absent."""
    now = timezone.now()
    user_ids = {user_id for user_id, _ in pairs}
    room_ids = {room_id for _, room_id in pairs}
    rows: dict[int, list[tuple[Any, ...]]] = {}
    for user_id, *row in (
        Sanction.objects.filter(
            Q(room__isnull=True) | Q(room_id__in=room_ids),
            user_id__in=user_ids,
            lifted_at__isnull=True,
        )
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .values_list("user_id", "kind", "room_id", "expires_at", "reason")
    ):
        rows.setdefault(user_id, []).append(tuple(row))
    found = {}
    for user_id, room_id in pairs:
        applicable = [row for row in rows.get(user_id, ()) if row[1] in (None, room_id)]
        if applicable:
            found[user_id, room_id] = _longest(applicable, now)
    return found


def _longest(rows: list[tuple[Any, ...]], now: datetime) -> SanctionInfo:
    """A permanent sanction outlasts any timed one; among timed ones the latest expiry wins."""
    return SanctionInfo(*sorted(rows, key=lambda r: (r[2] is None, r[2] or now))[-1])


@dataclass(frozen=True, slots=True)
class JoinHistory:
    """What `joined` carries: recent messages (no `since`) or everything after `since`."""

    messages: list[protocol.Frame]
    more: bool
    gap: bool
    deleted: list[int]


def join_histories(requests: list[tuple[RoomInfo, int | None]]) -> list[JoinHistory]:
    """The history of each (room, since) a join asked for. Sockets joining the same room
    from the same point in one batch (a storm, everyone with no `since`) share one read."""
    read: dict[tuple[int, int | None], JoinHistory] = {}
    outcomes = []
    for room, since in requests:
        key = (room.id, since)
        if key not in read:
            if since is None:
                page = message_recent(room=room)
                read[key] = JoinHistory(page.messages, page.more, gap=False, deleted=[])
            else:
                recovery = message_since(room=room, since=since)
                more = recovery.gap or since > 0
                read[key] = JoinHistory(recovery.messages, more, recovery.gap, recovery.deleted)
        outcomes.append(read[key])
    return outcomes


def user_is_moderator(*, user_id: int) -> bool:
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    return user is not None and user.has_perm(MODERATE_PERMISSION)


def user_socket_profiles(*, user_ids: Collection[int]) -> dict[int, SocketProfile]:
    """The connect-time profile of several users in four queries, however many they are:
    a reconnect storm checks its users in batches rather than one by one.

    `moderator` is what ModelBackend's has_perm(MODERATE_PERMISSION) answers: an active
    superuser, or the permission given to the user or to one of their groups."""
    users = get_user_model().objects.filter(pk__in=user_ids)
    rows = {
        pk: (active, superuser)
        for pk, active, superuser in users.values_list("pk", "is_active", "is_superuser")
    }
    active = [pk for pk, (is_active, _) in rows.items() if is_active]
    app_label, codename = MODERATE_PERMISSION.split(".", 1)
    active_users = get_user_model().objects.filter(pk__in=active)
    moderators = {pk for pk in active if rows[pk][1]}
    moderators.update(
        active_users.filter(
            user_permissions__codename=codename,
            user_permissions__content_type__app_label=app_label,
        ).values_list("pk", flat=True)
    )
    moderators.update(
        active_users.filter(
            groups__permissions__codename=codename,
            groups__permissions__content_type__app_label=app_label,
        ).values_list("pk", flat=True)
    )
    now = timezone.now()
    sanctions: dict[int, list[tuple[Any, ...]]] = {}
    for user_id, *row in (
        Sanction.objects.filter(user_id__in=active, room__isnull=True, lifted_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .values_list("user_id", "kind", "room_id", "expires_at", "reason")
    ):
        sanctions.setdefault(user_id, []).append(tuple(row))
    profiles = {}
    for user_id in user_ids:
        if user_id not in rows or not rows[user_id][0]:
            profiles[user_id] = SocketProfile(active=False, moderator=False, banned=None)
            continue
        banned = _longest(sanctions[user_id], now) if user_id in sanctions else None
        profiles[user_id] = SocketProfile(
            active=True, moderator=user_id in moderators, banned=banned
        )
    return profiles


def user_id_by_name(*, username: str) -> int | None:
    return get_user_model().objects.filter(username=username).values_list("pk", flat=True).first()
