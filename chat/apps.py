from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        post_migrate.connect(_ensure_moderators_group, sender=self)


# What the Moderators group may see and do, in admin and in chat: chat's own permissions,
# plus seeing users, which the sanction form's player search needs.
MODERATOR_AUTH_PERMISSIONS = ["view_user"]
MODERATOR_PERMISSIONS = [
    "moderate",
    "view_message",
    "change_message",
    "delete_message",
    "view_room",
    "change_room",
    "view_sanction",
    "add_sanction",
    "change_sanction",
    "view_moderationlog",
]


def _ensure_moderators_group(using: str = "default", **kwargs: Any) -> None:
    """After every migrate (permissions exist by then), make sure the group has its rights."""
    from django.contrib.auth.models import Group, Permission

    group, _ = Group.objects.using(using).get_or_create(name="Moderators")
    permissions = Permission.objects.using(using)
    group.permissions.add(
        *permissions.filter(content_type__app_label="chat", codename__in=MODERATOR_PERMISSIONS),
        *permissions.filter(
            content_type__app_label="auth", codename__in=MODERATOR_AUTH_PERMISSIONS
        ),
    )
