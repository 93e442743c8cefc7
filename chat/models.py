"""Chat's persistent state: rooms and the messages posted in them.

Accounts are Django's own users. Writes go through chat.services and reads through
chat.selectors; nothing else queries these models.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import Q

SLOW_MODE_MAX_SECONDS = 120


class Room(models.Model):
    """A chat room. Public rooms are readable by anyone; members-only rooms by members."""

    slug = models.SlugField(max_length=64, unique=True)
    title = models.CharField(max_length=200)
    is_public = models.BooleanField(
        default=True, help_text="Anyone can read; otherwise only members can join."
    )
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="chat_rooms"
    )
    archived = models.BooleanField(
        default=False, help_text="Archived rooms keep their history but accept no posts."
    )
    slow_mode_seconds = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(SLOW_MODE_MAX_SECONDS)],
        help_text=f"Seconds each player waits between posts (0-{SLOW_MODE_MAX_SECONDS}, 0 is off). "
        "Moderators are exempt.",
    )
    read_only = models.BooleanField(
        default=False, help_text="Only moderators can post while this is on."
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Message(models.Model):
    """One chat message. Ids increase, so they double as the recovery cursor (`since`)."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages"
    )
    body = models.TextField()
    created = models.DateTimeField(db_index=True)
    # The sender's own id for this message; a resend with the same one is answered with the
    # original ack instead of posting twice. NULL, not "", when absent: the uniqueness
    # constraint below applies only to messages that carry one.
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    deleted_at = models.DateTimeField(null=True, blank=True)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )

    class Meta:
        ordering = ["id"]
        permissions = [("moderate", "Can moderate chat: delete, time out, ban, slow mode")]
        indexes = [
            # History pages and `since` recovery: WHERE room_id = ? AND id > ? ORDER BY id.
            models.Index(fields=["room", "id"], name="chat_msg_room_id"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["room", "author", "client_id"],
                condition=Q(client_id__isnull=False),
                name="chat_msg_author_client_id",
            )
        ]

    def __str__(self) -> str:
        return f"#{self.pk} in {self.room_id}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class Sanction(models.Model):
    """A ban or a timeout, in one room or everywhere (room is empty), until lifted or expired."""

    class Kind(models.TextChoices):
        BAN = "ban", "ban"
        TIMEOUT = "timeout", "timeout"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_sanctions"
    )
    room = models.ForeignKey(
        Room,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="sanctions",
        help_text="Empty means every room.",
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    reason = models.CharField(max_length=500, blank=True)
    created = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty means permanent.")
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["user", "lifted_at"], name="chat_sanction_active")]

    def __str__(self) -> str:
        where = self.room.slug if self.room_id and self.room else "everywhere"
        return f"{self.kind} of {self.user} in {where}"


class ModerationLog(models.Model):
    """Append-only record of every moderation action: who did what to whom, when, why."""

    class Action(models.TextChoices):
        DELETE = "delete", "delete message"
        CLEAR = "clear", "clear room"
        TIMEOUT = "timeout", "timeout"
        BAN = "ban", "ban"
        UNBAN = "unban", "unban"
        SLOW_MODE = "slow_mode", "slow mode"
        READ_ONLY = "read_only", "read-only"

    created = models.DateTimeField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    action = models.CharField(max_length=16, choices=Action.choices)
    target = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    room = models.ForeignKey(Room, on_delete=models.SET_NULL, null=True, blank=True)
    message_id = models.BigIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    via = models.CharField(max_length=16, help_text="admin or chat")

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["-created"], name="chat_modlog_created")]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor} at {self.created:%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValueError("the moderation log is append-only")
        super().save(*args, **kwargs)
