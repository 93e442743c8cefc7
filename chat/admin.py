"""Django admin for rooms and messages."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from chat.models import Message, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ("slug", "title", "is_public", "archived", "created")
    list_filter = ("is_public", "archived")
    search_fields = ("slug", "title")
    prepopulated_fields = {"slug": ("title",)}
    filter_horizontal = ("members",)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "room", "author", "short_body", "created", "deleted_at")
    list_filter = ("room", ("deleted_at", admin.EmptyFieldListFilter))
    search_fields = ("body", "author__username", "room__slug")
    date_hierarchy = "created"
    list_select_related = ("room", "author")
    readonly_fields = ("room", "author", "body", "created", "client_id", "deleted_at", "deleted_by")
    show_full_result_count = False

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return obj.body if len(obj.body) <= 80 else obj.body[:79] + "…"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # messages are posted in chat, not typed into admin
