"""Create rooms and users for demos and load tests, and write their socket tokens.

    python manage.py seed_chat --rooms 10 --users 2000 --prefix load --tokens-file var/tokens.txt
    python manage.py seed_chat --demo

Rooms are `<prefix>-0 .. <prefix>-(N-1)`, users `<prefix>-0 .. <prefix>-(M-1)`; the token file
holds one token per line in user order. Running it again creates nothing twice. Seeded users
have no usable password: they connect with their tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from chat import services
from chat.auth import token_issue
from chat.models import Room

DEMO_ROOM = "lobby"
DEMO_ADMIN = "admin"
DEMO_PASSWORD = "chat-demo-admin"


class Command(BaseCommand):
    help = "Create rooms and users (and their socket tokens) for demos and load tests."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rooms", type=int, default=0, help="number of rooms to ensure")
        parser.add_argument("--users", type=int, default=0, help="number of users to ensure")
        parser.add_argument("--prefix", default="load", help="name prefix for rooms and users")
        parser.add_argument("--tokens-file", type=Path, help="write one token per user here")
        parser.add_argument(
            "--demo", action="store_true", help="ensure the demo room and admin (DEBUG only)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        rooms, users, prefix = options["rooms"], options["users"], options["prefix"]
        if rooms < 0 or users < 0:
            raise CommandError("--rooms and --users must not be negative")
        if not prefix or not all(c.isalnum() or c in "-_" for c in prefix):
            raise CommandError("--prefix must be letters, digits, '-' or '_'")
        if options["demo"]:
            self._demo()
        self._rooms(prefix, rooms)
        user_ids = self._users(prefix, users)
        if options["tokens_file"] is not None:
            path: Path = options["tokens_file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                "".join(
                    token_issue(user_id=pk, username=f"{prefix}-{i}") + "\n"
                    for i, pk in enumerate(user_ids)
                )
            )
            self.stdout.write(f"wrote {len(user_ids)} tokens to {path}")

    def _demo(self) -> None:
        if not settings.DEBUG:
            raise CommandError("--demo creates a known password; it runs only with DJANGO_DEBUG on")
        services.room_ensure(slug=DEMO_ROOM, title="Lobby")
        services.user_ensure(username=DEMO_ADMIN, password=DEMO_PASSWORD, is_staff=True)
        self.stdout.write(
            self.style.WARNING(
                f"demo admin (local use only): username {DEMO_ADMIN!r} password {DEMO_PASSWORD!r}"
            )
        )

    def _rooms(self, prefix: str, count: int) -> None:
        if not count:
            return
        wanted = [f"{prefix}-{i}" for i in range(count)]
        existing = set(Room.objects.filter(slug__in=wanted).values_list("slug", flat=True))
        Room.objects.bulk_create(
            [Room(slug=s, title=s.replace("-", " ").title()) for s in wanted if s not in existing],
            batch_size=500,
        )
        self.stdout.write(f"rooms: {count} ensured ({count - len(existing)} created)")

    def _users(self, prefix: str, count: int) -> list[int]:
        if not count:
            return []
        user_model = get_user_model()
        wanted = [f"{prefix}-{i}" for i in range(count)]
        with transaction.atomic():
            existing = set(
                user_model.objects.filter(username__in=wanted).values_list("username", flat=True)
            )
            fresh = []
            for name in wanted:
                if name not in existing:
                    user = user_model(username=name)
                    user.set_unusable_password()
                    fresh.append(user)
            user_model.objects.bulk_create(fresh, batch_size=500)
        ids = dict(user_model.objects.filter(username__in=wanted).values_list("username", "pk"))
        self.stdout.write(f"users: {count} ensured ({len(fresh)} created)")
        return [ids[name] for name in wanted]
