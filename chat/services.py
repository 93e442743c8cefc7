"""Writes: every state change in chat, and the only place that broadcasts.

Each action validates its untrusted input first, writes in one transaction and publishes
to the room only after the transaction commits, so no socket ever sees a message that
was rolled back. Actions are synchronous ORM code with keyword-only arguments; consumers
call them through database_sync_to_async, admin and commands call them directly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from chat import commands, hub, limits, protocol, selectors
from chat.batching import Batcher
from chat.errors import ChatError
from chat.models import SLOW_MODE_MAX_SECONDS, Message, ModerationLog, Room, Sanction
from chat.protocol import ErrorCode
from chat.selectors import MODERATE_PERMISSION as MODERATE
from chat.selectors import RoomInfo, to_ms
from monitoring import metrics

__all__ = ["ChatError", "PostResult", "banned_error"]

logger = logging.getLogger(__name__)


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


_MENTION = re.compile(r"(?<![\w@])@([\w.+-]{1,150})")


def _cap_combining(body: str, limit: int) -> str:
    """Keep at most `limit` combining marks on each character ("zalgo" text)."""
    out: list[str] = []
    run = 0
    for ch in body:
        if unicodedata.combining(ch):
            run += 1
            if run > limit:
                continue
        else:
            run = 0
        out.append(ch)
    return "".join(out)


def text_normalize(body: str) -> str:
    """NFC and trimmed, without controls, bidi controls, surrogates, private-use or
    unassigned code points, and with at most CHAT_MAX_COMBINING_MARKS marks per character."""
    body = unicodedata.normalize("NFC", body)
    body = "".join(ch for ch in body if _kept(ch))
    return _cap_combining(body, settings.CHAT_MAX_COMBINING_MARKS).strip()


def mentions(body: str) -> set[str]:
    """The distinct @names in a message, case-folded."""
    return {name.casefold() for name in _MENTION.findall(body)}


# --- rooms and users -------------------------------------------------------------------------


def room_enter(*, slug: str, user_id: int | None) -> RoomInfo:
    """The room a socket may join, or ChatError saying why not."""
    (outcome,) = room_enter_many([(slug, user_id)])
    if isinstance(outcome, ChatError):
        raise outcome
    return outcome


def room_enter_many(requests: list[tuple[str, int | None]]) -> list[RoomInfo | ChatError]:
    """room_enter for several (slug, user id) at once: what a storm of joins costs is a few
    queries per room, not per socket. Same answers, in order."""
    outcomes: list[RoomInfo | ChatError] = []
    rooms = selectors.rooms_by_slug(slugs={slug for slug, _ in requests})
    users: dict[str, set[int]] = {}
    for slug, user_id in requests:
        if slug in rooms and user_id is not None:
            users.setdefault(slug, set()).add(user_id)
    members = {
        rooms[slug].id: selectors.room_members_among(room_id=rooms[slug].id, user_ids=ids)
        for slug, ids in users.items()
        if not rooms[slug].is_public
    }
    sanctions = selectors.sanctions_active_in(
        pairs={(user_id, rooms[slug].id) for slug, ids in users.items() for user_id in ids}
    )
    for slug, user_id in requests:
        room = rooms.get(slug)
        if room is None:
            outcomes.append(ChatError(ErrorCode.UNKNOWN_ROOM, f"no room {slug!r}"))
        elif not room.is_public and user_id is None:
            outcomes.append(
                ChatError(ErrorCode.AUTH_REQUIRED, "this room is for members; sign in first")
            )
        elif not room.is_public and user_id not in members[room.id]:
            outcomes.append(ChatError(ErrorCode.FORBIDDEN, "this room is for members only"))
        elif user_id is not None and (user_id, room.id) in sanctions:
            outcomes.append(banned_error(sanctions[user_id, room.id], room=room.slug))
        else:
            outcomes.append(room)
    return outcomes


def banned_error(sanction: selectors.SanctionInfo, *, room: str | None = None) -> ChatError:
    until = "permanently" if sanction.expires_at is None else "until the timeout ends"
    where = f"from {room}" if room and sanction.room_id is not None else "from chat"
    return ChatError(
        ErrorCode.BANNED,
        f"you are {'banned' if sanction.kind == 'ban' else 'timed out'} {where} {until}",
        kind=sanction.kind,
        expires_ms=sanction.expires_ms,
        reason=sanction.reason,
    )


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


# --- posting ---------------------------------------------------------------------------------


async def message_submit(
    *,
    user_id: int,
    moderator: bool,
    room: RoomInfo,
    body: str,
    client_id: str | None,
    slow_mode: int,
) -> PostResult | protocol.Frame:
    """A `message` frame from a socket: a moderator command, or a post past the abuse limits.

    Returns the PostResult of a post, or the notice frame answering a command. Posts that
    arrive while the database thread is busy are stored together, in one transaction
    (chat.batching); each new message is then published from the event loop, so the thread
    never waits on Redis.
    """
    name = commands.name_of(body.strip())
    if name is not None:
        if not moderator:
            raise ChatError(ErrorCode.FORBIDDEN, f"/{name} is for moderators")
        command = commands.parse(body)
        assert command is not None
        detail = await database_sync_to_async(command_run)(
            actor_id=user_id, room=room, command=command
        )
        return protocol.notice(room=room.slug, detail=detail, ref=client_id)
    request = PostRequest(
        user_id=user_id,
        room=room,
        body=body,
        client_id=client_id,
        moderator=moderator,
        slow_mode=slow_mode,
    )
    result = await _posts.submit(request)
    if not result.duplicate or _recent(result.frame):
        # Batches come back from the database thread in commit order and their callers
        # resume in that order; the lock keeps them in it on their way to Redis.
        #
        # A resend of a message stored moments ago is published again: the first publish
        # may never have happened (the process that stored it was killed in between), and
        # nothing else would ever deliver it to members already past its id. Members drop
        # the second copy by id, as docs/protocol.md asks of every client.
        async with _publish_order():
            try:
                await hub.publish(room.id, result.frame)
            except Exception:
                raise _unpublished(result.frame) from None
    return result


# A resend answered as a duplicate is published again if its original is at most this old.
REPUBLISH_WITHIN_MS = 60_000


def _recent(frame: protocol.Frame) -> bool:
    return bool(to_ms(timezone.now()) - frame["ts"] <= REPUBLISH_WITHIN_MS)


@dataclass(frozen=True, slots=True)
class PostRequest:
    """One post as a socket sent it; `moderator` and `slow_mode` as the socket knows them."""

    user_id: int
    room: RoomInfo
    body: str
    client_id: str | None = None
    moderator: bool = False
    slow_mode: int = 0


_publish_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _publish_order() -> asyncio.Lock:
    """The running loop's lock for publishing posts (a lock belongs to one loop)."""
    loop = asyncio.get_running_loop()
    lock = _publish_locks.get(loop)
    if lock is None:
        lock = _publish_locks[loop] = asyncio.Lock()
    return lock


def _validate_body(body: str) -> None:
    if not body:
        raise ChatError(ErrorCode.EMPTY, "the message is empty")
    limit = settings.CHAT_MAX_MESSAGE_LENGTH
    if len(body) > limit:
        raise ChatError(ErrorCode.TOO_LONG, f"messages are at most {limit} characters", limit=limit)
    most = settings.CHAT_MAX_MENTIONS
    if len(mentions(body)) > most:
        raise ChatError(
            ErrorCode.TOO_MANY_MENTIONS, f"mention at most {most} people per message", limit=most
        )


def message_post_many(requests: list[PostRequest]) -> list[PostResult | ChatError]:
    """Store several posts in one transaction.

    Each post meets the abuse limits (chat.limits; `moderator` and `slow_mode` as the socket
    knows them), then what must be current (the room still takes posts, the author is active
    and not banned) is checked against the database. A resend with a `client_id` this user
    already used in this room returns the original with duplicate=True.

    A refused post comes back as its ChatError and leaves the others alone. The checks read
    outside the transaction, which holds the write lock only for the inserts. Nothing is
    published: the caller publishes each new message once this has returned (committed).
    """
    checked = _message_check_many(requests)
    admitted = [
        (index, request, *outcome)
        for index, (request, outcome) in enumerate(zip(requests, checked, strict=True))
        if isinstance(outcome, tuple)
    ]
    stored: dict[int, PostResult] = {}
    if admitted:
        # One insert per post, each in its own savepoint, so that a resend racing its
        # original on another process fails alone. (One multi-row insert per batch measured
        # 5-15 % more CPU per post at these batch sizes: bench/run.py, g-size-10 and -100.)
        with transaction.atomic():
            for index, request, body, username in admitted:
                stored[index] = _message_insert(request, body, username)
    outcomes: list[PostResult | ChatError] = []
    for index, outcome in enumerate(checked):
        if isinstance(outcome, tuple):
            outcome = stored[index]
        elif isinstance(outcome, _Twin):
            original = outcomes[outcome.index]
            if isinstance(original, PostResult):
                outcome = PostResult(frame=original.frame, duplicate=True)
            else:
                outcome = original
        outcomes.append(outcome)
    return outcomes


@dataclass(frozen=True, slots=True)
class _Twin:
    """A post whose client_id an earlier post of the same batch carries: it gets that post's
    answer, as a duplicate."""

    index: int


_posts: Batcher[PostRequest, PostResult] = Batcher("post", message_post_many, limit=200)


def _message_check_many(
    requests: list[PostRequest],
) -> list[PostResult | ChatError | tuple[str, str] | _Twin]:
    """For each post: the original of a resend, (normalized body, author's username) of a post
    that may be stored, or the ChatError saying why not. A few queries per batch rather than
    per post: the rooms, the authors, the resends and the sanctions are each read once for
    everyone, and the abuse limits of every post are one Redis round trip."""
    originals = _messages_by_client_id(requests)
    decided: dict[int, PostResult | ChatError | tuple[str, str] | _Twin] = {}
    bodies: dict[int, str] = {}  # index -> normalized body, of the posts the limits count
    first: dict[tuple[int, int, str], int] = {}  # a client_id's first post in this batch
    for index, request in enumerate(requests):
        body = text_normalize(request.body)
        try:
            _validate_body(body)
        except ChatError as exc:
            decided[index] = exc
            continue
        if request.client_id is not None:
            key = (request.room.id, request.user_id, request.client_id)
            original = originals.get(key)
            if original is not None:
                decided[index] = PostResult(frame=original, duplicate=True)
                continue
            if key in first:
                # A resend queued behind its original: answered once the original is.
                decided[index] = _Twin(first[key])
                continue
            first[key] = index
        bodies[index] = body
    counted = list(bodies)
    posts = [
        limits.Post(
            user_id=requests[index].user_id,
            room_id=requests[index].room.id,
            body=bodies[index],
            moderator=requests[index].moderator,
            slow_mode_seconds=requests[index].slow_mode,
        )
        for index in counted
    ]
    admitted = []
    for index, refusal in zip(counted, limits.check_posts(posts) if posts else [], strict=True):
        if refusal is not None:
            decided[index] = refusal
        else:
            admitted.append(index)
    if admitted:
        wanted = [requests[index] for index in admitted]
        rooms = selectors.rooms_by_id(room_ids={request.room.id for request in wanted})
        authors = selectors.users_active(user_ids={request.user_id for request in wanted})
        sanctions = selectors.sanctions_active_in(
            pairs={(request.user_id, request.room.id) for request in wanted}
        )
        for index in admitted:
            try:
                username = _current_author(requests[index], rooms, authors, sanctions)
                decided[index] = (bodies[index], username)
            except ChatError as exc:
                decided[index] = exc
    return [decided[index] for index in range(len(requests))]


def _current_author(
    request: PostRequest,
    rooms: dict[int, RoomInfo],
    authors: dict[int, Any],
    sanctions: dict[tuple[int, int], selectors.SanctionInfo],
) -> str:
    """The author's username if the room still takes this post from them, else ChatError."""
    room, user_id = request.room, request.user_id
    current = rooms.get(room.id)
    if current is None:
        raise ChatError(ErrorCode.UNKNOWN_ROOM, "this room no longer exists")
    if current.archived:
        raise ChatError(ErrorCode.ROOM_ARCHIVED, "this room is archived and read-only")
    author = authors.get(user_id)
    if author is None:
        raise ChatError(ErrorCode.AUTH_REQUIRED, "this account cannot post")
    if current.read_only and not author.has_perm(MODERATE):
        raise ChatError(ErrorCode.READ_ONLY, "only moderators can post here right now")
    sanction = sanctions.get((user_id, room.id))
    if sanction is not None:
        raise banned_error(sanction, room=room.slug)
    return str(author.get_username())


def _message_insert(request: PostRequest, body: str, username: str) -> PostResult:
    """Insert one checked post inside the caller's transaction."""
    room, user_id, client_id = request.room, request.user_id, request.client_id
    created = timezone.now()
    try:
        # A savepoint: a resend racing its original fails here without undoing the others.
        with transaction.atomic():
            message = Message.objects.create(
                room_id=room.id, author_id=user_id, body=body, created=created, client_id=client_id
            )
    except IntegrityError:
        # Two resends raced; the first one stored the message.
        if client_id is None:
            raise
        original = _messages_by_client_id([request]).get((room.id, user_id, client_id))
        if original is None:
            raise
        return PostResult(frame=original, duplicate=True)
    frame = protocol.message(
        room=room.slug,
        id=message.pk,
        user=username,
        body=body,
        ts=to_ms(created),
        client_id=client_id,
    )
    return PostResult(frame=frame, duplicate=False)


def _unpublished(frame: protocol.Frame) -> ChatError:
    return ChatError(
        ErrorCode.UNAVAILABLE,
        "message stored, but live delivery is down; members will get it on reconnect",
        id=frame["id"],
    )


def _messages_by_client_id(
    requests: list[PostRequest],
) -> dict[tuple[int, int, str], protocol.Frame]:
    """Stored messages that these posts would resend, by (room id, author id, client_id), in
    one query for the whole batch."""
    asked = {
        (r.room.id, r.user_id, r.client_id): r.room.slug
        for r in requests
        if r.client_id is not None
    }
    if not asked:
        return {}
    rows = Message.objects.filter(
        room_id__in={room_id for room_id, _, _ in asked},
        author_id__in={user_id for _, user_id, _ in asked},
        client_id__in={client_id for _, _, client_id in asked},
    ).values_list("id", "room_id", "author_id", "author__username", "body", "created", "client_id")
    found: dict[tuple[int, int, str], protocol.Frame] = {}
    for pk, room_id, author_id, username, body, created, client_id in rows:
        slug = asked.get((room_id, author_id, client_id or ""))
        if slug is not None and client_id:  # the sets also match triples nobody asked for
            found[room_id, author_id, client_id] = protocol.message(
                room=slug, id=pk, user=username, body=body, ts=to_ms(created), client_id=client_id
            )
    return found


async def typing_publish(*, room: RoomInfo, username: str) -> None:
    """Tell the room's other members that `username` is typing. Never stored."""
    await hub.publish(room.id, protocol.typing(room=room.slug, user=username))


# --- moderation ------------------------------------------------------------------------------
#
# Every action checks that the actor may moderate, changes state, writes the moderation log
# in the same transaction, and acts on open sockets after commit. If that live part fails
# (Redis down) the state still holds: joins and posts check it in the database.


def _require_moderator(actor_id: int) -> None:
    if not selectors.user_is_moderator(user_id=actor_id):
        raise ChatError(ErrorCode.FORBIDDEN, "you do not have the moderation permission")


def _log(
    *,
    actor_id: int,
    action: str,
    via: str,
    target_id: int | None = None,
    room_id: int | None = None,
    message_id: int | None = None,
    reason: str = "",
    **detail: Any,
) -> None:
    ModerationLog.objects.create(
        created=timezone.now(),
        actor_id=actor_id,
        action=action,
        via=via,
        target_id=target_id,
        room_id=room_id,
        message_id=message_id,
        reason=reason[:500],
        detail=detail,
    )
    metrics.MODERATION_ACTIONS.labels(action).inc()


async def _await(call: Callable[[], Awaitable[None]]) -> None:
    await call()


def _after_commit(call: Callable[[], Awaitable[None]]) -> None:
    """Run a live effect once the transaction commits; a failure is logged, not raised."""

    def run() -> None:
        try:
            async_to_sync(_await)(call)
        except Exception:
            metrics.LAYER_ERRORS.labels("moderation").inc()
            logger.warning(
                "moderation: live effect failed; the stored state still holds", exc_info=True
            )

    transaction.on_commit(run)


def message_delete_many(
    *, actor_id: int, message_ids: list[int], via: str, reason: str = ""
) -> int:
    """Soft-delete messages; every member on every process is told to drop them."""
    _require_moderator(actor_id)
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            Message.objects.select_for_update()
            .filter(pk__in=message_ids, deleted_at__isnull=True)
            .values_list("id", "room_id", "room__slug", "author_id")
        )
        Message.objects.filter(pk__in=[r[0] for r in rows]).update(
            deleted_at=now, deleted_by_id=actor_id
        )
        for pk, room_id, slug, author_id in rows:
            _log(
                actor_id=actor_id,
                action=ModerationLog.Action.DELETE,
                via=via,
                target_id=author_id,
                room_id=room_id,
                message_id=pk,
                reason=reason,
            )
            _after_commit(partial(hub.publish, room_id, protocol.delete(room=slug, id=pk)))
    return len(rows)


def message_delete(*, actor_id: int, message_id: int, via: str, reason: str = "") -> bool:
    return (
        message_delete_many(actor_id=actor_id, message_ids=[message_id], via=via, reason=reason)
        == 1
    )


def room_clear(*, actor_id: int, room_id: int, via: str, reason: str = "") -> int:
    """Soft-delete every message of a room and tell its members to clear it."""
    _require_moderator(actor_id)
    room = Room.objects.get(pk=room_id)
    with transaction.atomic():
        count = Message.objects.filter(room_id=room_id, deleted_at__isnull=True).update(
            deleted_at=timezone.now(), deleted_by_id=actor_id
        )
        _log(
            actor_id=actor_id,
            action=ModerationLog.Action.CLEAR,
            via=via,
            room_id=room_id,
            reason=reason,
            count=count,
        )
        _after_commit(partial(hub.publish, room_id, protocol.clear(room=room.slug)))
    return count


def sanction_apply(
    *,
    actor_id: int,
    target_id: int,
    kind: str,
    room_id: int | None,
    duration_s: int | None,
    reason: str,
    via: str,
) -> Sanction:
    """Ban or time out a user in one room (room_id) or everywhere (None).

    Everywhere: their open sockets on every process get `error banned` and close 4003.
    One room: their sockets leave that room with `error banned` and `left`.
    """
    sanction_check(actor_id=actor_id, target_id=target_id, kind=kind)
    now = timezone.now()
    expires = now + timedelta(seconds=duration_s) if duration_s else None
    room = Room.objects.get(pk=room_id) if room_id is not None else None
    with transaction.atomic():
        sanction = Sanction.objects.create(
            user_id=target_id,
            room=room,
            kind=kind,
            reason=reason[:500],
            created=now,
            created_by_id=actor_id,
            expires_at=expires,
        )
        _log(
            actor_id=actor_id,
            action=kind,
            via=via,
            target_id=target_id,
            room_id=room_id,
            reason=reason,
            duration_s=duration_s,
        )
        info = selectors.SanctionInfo(kind, room_id, expires, sanction.reason)
        refusal = banned_error(info, room=room.slug if room else None)
        frame = protocol.error(
            refusal.code, refusal.detail, ref=room.slug if room else None, **refusal.extra
        )
        if room is None:
            _after_commit(
                partial(
                    hub.control,
                    "close_user",
                    user_id=target_id,
                    code=int(protocol.CloseCode.BANNED),
                    frame=frame,
                )
            )
        else:
            _after_commit(
                partial(hub.control, "kick", user_id=target_id, room_id=room.id, frame=frame)
            )
    return sanction


def sanction_check(*, actor_id: int, target_id: int, kind: str) -> None:
    """Raise ChatError unless `actor_id` may ban or time out `target_id` (forms use it to
    refuse before saving anything)."""
    _require_moderator(actor_id)
    if kind not in Sanction.Kind.values:
        raise ChatError(ErrorCode.BAD_COMMAND, f"unknown sanction {kind!r}")
    target = get_user_model().objects.filter(pk=target_id).first()
    if target is None:
        raise ChatError(ErrorCode.BAD_COMMAND, "no such user")
    actor = get_user_model().objects.get(pk=actor_id)
    if target.is_superuser or (target.has_perm(MODERATE) and not actor.is_superuser):
        raise ChatError(ErrorCode.FORBIDDEN, "moderators can only be sanctioned by an admin")


def sanction_lift(*, actor_id: int, target_id: int, room_id: int | None, via: str) -> int:
    """Lift the user's active bans and timeouts in that room (or the global ones for None)."""
    _require_moderator(actor_id)
    now = timezone.now()
    with transaction.atomic():
        scope = Q(room__isnull=True) if room_id is None else Q(room_id=room_id)
        count = Sanction.objects.filter(scope, user_id=target_id, lifted_at__isnull=True).update(
            lifted_at=now, lifted_by_id=actor_id
        )
        _log(
            actor_id=actor_id,
            action=ModerationLog.Action.UNBAN,
            via=via,
            target_id=target_id,
            room_id=room_id,
            count=count,
        )
    return count


def room_set_rules(
    *,
    actor_id: int,
    room_id: int,
    via: str,
    slow_mode: int | None = None,
    read_only: bool | None = None,
) -> RoomInfo:
    """Change slow mode (0-120 s) or read-only; every member is told the new rules."""
    _require_moderator(actor_id)
    if slow_mode is not None and not 0 <= slow_mode <= SLOW_MODE_MAX_SECONDS:
        raise ChatError(ErrorCode.BAD_COMMAND, f"slow mode is 0-{SLOW_MODE_MAX_SECONDS} seconds")
    with transaction.atomic():
        room = Room.objects.select_for_update().get(pk=room_id)
        if slow_mode is not None and slow_mode != room.slow_mode_seconds:
            room.slow_mode_seconds = slow_mode
            _log(
                actor_id=actor_id,
                action=ModerationLog.Action.SLOW_MODE,
                via=via,
                room_id=room_id,
                seconds=slow_mode,
            )
        if read_only is not None and read_only != room.read_only:
            room.read_only = read_only
            _log(
                actor_id=actor_id,
                action=ModerationLog.Action.READ_ONLY,
                via=via,
                room_id=room_id,
                enabled=read_only,
            )
        room.save(update_fields=["slow_mode_seconds", "read_only"])
        frame = protocol.room_settings(
            room=room.slug, slow_mode=room.slow_mode_seconds, read_only=room.read_only
        )
        _after_commit(partial(hub.publish, room_id, frame))
    info = selectors.room_get_by_id(room_id=room_id)
    assert info is not None
    return info


def command_run(*, actor_id: int, room: RoomInfo, command: commands.Command) -> str:
    """Carry out an in-chat moderator command in `room`; returns what to tell the moderator."""
    via = "chat"
    match command:
        case commands.Delete(message_id=message_id):
            # A command acts on the room it is typed in, never on another one.
            in_room = Message.objects.filter(pk=message_id, room_id=room.id).exists()
            if not in_room or not message_delete(actor_id=actor_id, message_id=message_id, via=via):
                raise ChatError(ErrorCode.BAD_COMMAND, f"no message #{message_id} to delete")
            return f"deleted message #{message_id}"
        case commands.Timeout(username=username, seconds=seconds, reason=reason):
            target = _target(username)
            sanction_apply(
                actor_id=actor_id,
                target_id=target,
                kind=Sanction.Kind.TIMEOUT,
                room_id=room.id,
                duration_s=seconds,
                reason=reason,
                via=via,
            )
            return f"timed out {username} for {seconds} s"
        case commands.Ban(username=username, reason=reason):
            sanction_apply(
                actor_id=actor_id,
                target_id=_target(username),
                kind=Sanction.Kind.BAN,
                room_id=room.id,
                duration_s=None,
                reason=reason,
                via=via,
            )
            return f"banned {username} from {room.slug}"
        case commands.Unban(username=username):
            count = sanction_lift(
                actor_id=actor_id, target_id=_target(username), room_id=room.id, via=via
            )
            return f"lifted {count} ban(s) or timeout(s) of {username}"
        case commands.Slow(seconds=seconds):
            room_set_rules(actor_id=actor_id, room_id=room.id, via=via, slow_mode=seconds)
            return f"slow mode {seconds} s" if seconds else "slow mode off"
        case commands.ReadOnly(enabled=enabled):
            room_set_rules(actor_id=actor_id, room_id=room.id, via=via, read_only=enabled)
            return "read-only on" if enabled else "read-only off"
        case commands.Clear():
            count = room_clear(actor_id=actor_id, room_id=room.id, via=via)
            return f"cleared {count} message(s)"
    raise ChatError(ErrorCode.BAD_COMMAND, "unknown command")


def _target(username: str) -> int:
    user_id = selectors.user_id_by_name(username=username.lstrip("@"))
    if user_id is None:
        raise ChatError(ErrorCode.BAD_COMMAND, f"no user named {username!r}")
    return user_id
