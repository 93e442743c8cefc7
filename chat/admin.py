"""Django admin for moderators: messages, rooms, bans and timeouts, and the moderation log.

Every moderation action here goes through chat.services, so it checks the `chat.moderate`
permission (the Moderators group has it), writes the moderation log and takes effect on
open sockets on every process. Staff without the permission can look but not moderate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from chat import services
from chat.errors import ChatError
from chat.models import Message, ModerationLog, Room, Sanction
from chat.selectors import MODERATE_PERMISSION


def _actor(request: HttpRequest) -> int:
    user_id = request.user.pk
    assert user_id is not None, "admin views only run for signed-in staff"
    return int(user_id)


def _can_moderate(request: HttpRequest) -> bool:
    return bool(request.user.has_perm(MODERATE_PERMISSION))


class ModerationMixin:
    """`allowed_permissions = ("moderate",)` on an action requires chat.moderate."""

    def has_moderate_permission(self, request: HttpRequest) -> bool:
        return _can_moderate(request)


def _run(
    modeladmin: admin.ModelAdmin[Any], request: HttpRequest, action: Callable[[], str]
) -> None:
    """Run one service call and report its outcome (or refusal) on the admin page."""
    try:
        modeladmin.message_user(request, action(), messages.SUCCESS)
    except ChatError as exc:
        modeladmin.message_user(request, exc.detail, messages.ERROR)


# --- messages --------------------------------------------------------------------------------


def _sanction_authors(
    modeladmin: admin.ModelAdmin[Any],
    request: HttpRequest,
    queryset: QuerySet[Message],
    *,
    kind: str,
    seconds: int | None,
    everywhere: bool = False,
) -> None:
    pairs: set[tuple[int, int | None]] = set(queryset.values_list("author_id", "room_id"))
    if everywhere:
        pairs = {(author, None) for author, _ in pairs}
    done = 0
    for author_id, room_id in pairs:
        try:
            services.sanction_apply(
                actor_id=_actor(request),
                target_id=author_id,
                kind=kind,
                room_id=room_id,
                duration_s=seconds,
                reason=f"from admin ({kind})",
                via="admin",
            )
            done += 1
        except ChatError as exc:
            modeladmin.message_user(request, exc.detail, messages.ERROR)
    if done:
        what = "banned" if kind == Sanction.Kind.BAN else f"timed out for {seconds} s"
        modeladmin.message_user(request, f"{done} author(s) {what}.", messages.SUCCESS)


def _timeout_action(seconds: int, label: str) -> Any:
    @admin.action(description=f"Time out authors for {label} (in the message's room)")
    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        _sanction_authors(
            modeladmin, request, queryset, kind=Sanction.Kind.TIMEOUT, seconds=seconds
        )

    action.__name__ = f"timeout_{seconds}"
    action.allowed_permissions = ("moderate",)  # type: ignore[attr-defined]
    return action


@admin.action(description="Ban authors (in the message's room)", permissions=["moderate"])
def ban_authors(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Message]) -> None:
    _sanction_authors(modeladmin, request, queryset, kind=Sanction.Kind.BAN, seconds=None)


@admin.action(description="Ban authors everywhere", permissions=["moderate"])
def ban_authors_everywhere(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[Message]
) -> None:
    _sanction_authors(
        modeladmin, request, queryset, kind=Sanction.Kind.BAN, seconds=None, everywhere=True
    )


@admin.register(Message)
class MessageAdmin(ModerationMixin, admin.ModelAdmin):
    list_display = ("id", "room", "author", "short_body", "created", "deleted_at")
    list_filter = (
        "room",
        ("author", admin.RelatedOnlyFieldListFilter),
        ("deleted_at", admin.EmptyFieldListFilter),
        "created",
    )
    search_fields = ("body", "author__username", "room__slug")
    date_hierarchy = "created"
    list_select_related = ("room", "author")
    readonly_fields = ("room", "author", "body", "created", "client_id", "deleted_at", "deleted_by")
    show_full_result_count = False
    actions = [
        "delete_selected",
        _timeout_action(600, "10 minutes"),
        _timeout_action(3600, "1 hour"),
        _timeout_action(86400, "24 hours"),
        ban_authors,
        ban_authors_everywhere,
    ]

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return obj.body if len(obj.body) <= 80 else obj.body[:79] + "…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # messages are posted in chat, not typed into admin

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a message is deleted, never edited

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _can_moderate(request)

    def delete_model(self, request: HttpRequest, obj: Message) -> None:
        """Deleting is a soft delete that every open chat sees at once."""
        self.delete_queryset(request, Message.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        """The changelist's bulk delete goes through the same service: never a hard delete."""
        ids = list(queryset.values_list("pk", flat=True))

        def delete() -> str:
            count = services.message_delete_many(
                actor_id=_actor(request), message_ids=ids, via="admin"
            )
            return f"{count} message(s) deleted"

        _run(self, request, delete)


# --- rooms -----------------------------------------------------------------------------------


def _slow_action(seconds: int) -> Any:
    label = "Turn slow mode off" if seconds == 0 else f"Set slow mode to {seconds} s"

    @admin.action(description=label)
    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Room]) -> None:
        for room in queryset:

            def set_slow(room: Room = room) -> str:
                info = services.room_set_rules(
                    actor_id=_actor(request), room_id=room.pk, via="admin", slow_mode=seconds
                )
                return f"{info.slug}: slow mode {info.slow_mode} s"

            _run(modeladmin, request, set_slow)

    action.__name__ = f"slow_{seconds}"
    action.allowed_permissions = ("moderate",)  # type: ignore[attr-defined]
    return action


@admin.action(description="Toggle read-only (only moderators post)", permissions=["moderate"])
def toggle_read_only(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Room]) -> None:
    for room in queryset:

        def toggle(room: Room = room) -> str:
            info = services.room_set_rules(
                actor_id=_actor(request), room_id=room.pk, via="admin", read_only=not room.read_only
            )
            return f"{info.slug}: read-only {'on' if info.read_only else 'off'}"

        _run(modeladmin, request, toggle)


@admin.action(description="Clear the chat of selected rooms", permissions=["moderate"])
def clear_rooms(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Room]) -> None:
    for room in queryset:

        def clear(room: Room = room) -> str:
            count = services.room_clear(actor_id=_actor(request), room_id=room.pk, via="admin")
            return f"{room.slug}: cleared {count} message(s)"

        _run(modeladmin, request, clear)


@admin.register(Room)
class RoomAdmin(ModerationMixin, admin.ModelAdmin):
    list_display = ("slug", "title", "is_public", "archived", "slow_mode_seconds", "read_only")
    list_filter = ("is_public", "archived", "read_only")
    search_fields = ("slug", "title")
    prepopulated_fields = {"slug": ("title",)}
    filter_horizontal = ("members",)
    actions = [
        clear_rooms,
        toggle_read_only,
        _slow_action(0),
        _slow_action(10),
        _slow_action(30),
        _slow_action(120),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is not None and not _can_moderate(request):
            return ("slow_mode_seconds", "read_only")
        return ()

    def save_model(self, request: HttpRequest, obj: Room, form: Any, change: bool) -> None:
        """Rule changes on an existing room go through the service: logged and announced."""
        rules = {"slow_mode_seconds", "read_only"} & set(form.changed_data)
        if not change or not rules:
            super().save_model(request, obj, form, change)
            return
        slow_mode, read_only = obj.slow_mode_seconds, obj.read_only
        current = Room.objects.get(pk=obj.pk)
        obj.slow_mode_seconds, obj.read_only = current.slow_mode_seconds, current.read_only
        super().save_model(request, obj, form, change)
        try:
            services.room_set_rules(
                actor_id=_actor(request),
                room_id=obj.pk,
                via="admin",
                slow_mode=slow_mode,
                read_only=read_only,
            )
        except ChatError as exc:
            self.message_user(request, exc.detail, messages.ERROR)


# --- sanctions -------------------------------------------------------------------------------


class ActiveFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "in force"), ("over", "lifted or expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Sanction]) -> QuerySet[Sanction]:
        now = timezone.now()
        active = queryset.filter(lifted_at__isnull=True).exclude(expires_at__lte=now)
        if self.value() == "active":
            return active
        if self.value() == "over":
            return queryset.exclude(pk__in=active.values("pk"))
        return queryset


@admin.action(description="Lift (unban) selected", permissions=["moderate"])
def lift_sanctions(modeladmin: Any, request: HttpRequest, queryset: QuerySet[Sanction]) -> None:
    for user_id, room_id in set(
        queryset.filter(lifted_at__isnull=True).values_list("user_id", "room_id")
    ):

        def lift(user_id: int = user_id, room_id: int | None = room_id) -> str:
            count = services.sanction_lift(
                actor_id=_actor(request), target_id=user_id, room_id=room_id, via="admin"
            )
            return f"lifted {count} ban(s) or timeout(s)"

        _run(modeladmin, request, lift)


class SanctionForm(forms.ModelForm):
    """Refuses, before anything is saved, a sanction the service would refuse."""

    actor_id: int

    class Meta:
        model = Sanction
        fields = ("user", "room", "kind", "expires_at", "reason")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        user = data.get("user")
        if user is not None and data.get("kind"):
            try:
                services.sanction_check(
                    actor_id=self.actor_id, target_id=user.pk, kind=data["kind"]
                )
            except ChatError as exc:
                raise forms.ValidationError(exc.detail) from None
        expires = data.get("expires_at")
        if expires is not None and expires <= timezone.now():
            self.add_error("expires_at", "choose a time in the future, or leave it empty")
        return data


@admin.register(Sanction)
class SanctionAdmin(ModerationMixin, admin.ModelAdmin):
    list_display = ("user", "kind", "room", "created", "expires_at", "lifted_at", "created_by")
    list_filter = (ActiveFilter, "kind", "room")
    search_fields = ("user__username", "reason")
    autocomplete_fields = ("user",)
    fields = ("user", "room", "kind", "expires_at", "reason")
    form = SanctionForm
    actions = [lift_sanctions]

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form: Any = super().get_form(request, obj, change, **kwargs)
        form.actor_id = _actor(request)
        return form

    def has_add_permission(self, request: HttpRequest) -> bool:
        return _can_moderate(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # lift and re-apply instead: the log keeps both

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Sanction, form: Any, change: bool) -> None:
        """A sanction added here is applied by the service: logged, and felt at once."""
        seconds = None
        if obj.expires_at is not None:
            seconds = max(1, int((obj.expires_at - timezone.now()).total_seconds()))
        try:
            created = services.sanction_apply(
                actor_id=_actor(request),
                target_id=obj.user_id,
                kind=obj.kind,
                room_id=obj.room_id,
                duration_s=seconds,
                reason=obj.reason,
                via="admin",
            )
        except ChatError as exc:
            self.message_user(request, exc.detail, messages.ERROR)
            return
        obj.pk = created.pk


# --- the log ---------------------------------------------------------------------------------


@admin.register(ModerationLog)
class ModerationLogAdmin(admin.ModelAdmin):
    list_display = ("created", "actor", "action", "target", "room", "message_id", "via", "reason")
    list_filter = ("action", "via", "room")
    search_fields = ("actor__username", "target__username", "reason")
    date_hierarchy = "created"
    list_select_related = ("actor", "target", "room")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
