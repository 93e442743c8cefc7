"""Chat's persistent state: rooms and the messages posted in them.

Accounts are Django's own users. Writes go through chat.services and reads through
chat.selectors; nothing else queries these models.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


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
        indexes = [
            # History pages and `since` recovery: WHERE room_id = ? AND id > ? ORDER BY id.
            models.Index(fields=["room", "id"], name="chat_msg_room_id"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["author", "client_id"],
                condition=Q(client_id__isnull=False),
                name="chat_msg_author_client_id",
            )
        ]

    def __str__(self) -> str:
        return f"#{self.pk} in {self.room_id}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None
