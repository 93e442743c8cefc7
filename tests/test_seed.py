"""`manage.py seed_chat`: rooms, users and tokens for demos and load tests, idempotent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from chat.auth import token_verify
from chat.models import Room

pytestmark = pytest.mark.django_db


def test_seed_creates_rooms_users_and_tokens_once(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    for _ in range(2):
        call_command(
            "seed_chat", rooms=3, users=4, prefix="cup", tokens_file=tokens, stdout=_Sink()
        )
    assert sorted(Room.objects.values_list("slug", flat=True)) == ["cup-0", "cup-1", "cup-2"]
    users = get_user_model().objects.filter(username__startswith="cup-")
    assert users.count() == 4
    lines = tokens.read_text().splitlines()
    identities = [token_verify(line) for line in lines]
    assert [i.username for i in identities if i] == ["cup-0", "cup-1", "cup-2", "cup-3"]
    assert not any(u.has_usable_password() for u in users)


def test_demo_needs_debug(settings: Any) -> None:
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DEBUG"):
        call_command("seed_chat", demo=True, stdout=_Sink())


def test_demo_makes_a_room_and_an_admin(settings: Any) -> None:
    settings.DEBUG = True
    out = _Sink()
    call_command("seed_chat", demo=True, stdout=out)
    assert Room.objects.filter(slug="lobby").exists()
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password("chat-demo-admin")
    assert "chat-demo-admin" in out.text


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(CommandError, match="prefix"):
        call_command("seed_chat", rooms=1, prefix="no spaces", stdout=_Sink())


class _Sink:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass
