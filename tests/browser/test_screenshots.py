"""Screenshots of the main states of the chat page, for the README (docs/screenshots/).

Skipped unless CHAT_SCREENSHOTS_DIR names where to write them:

    CHAT_SCREENSHOTS_DIR=docs/screenshots .venv/bin/python -m pytest tests/browser -k screenshots
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from chat.models import Message
from tests.browser.pages import Chat, messages

OUT = os.environ.get("CHAT_SCREENSHOTS_DIR")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not OUT, reason="set CHAT_SCREENSHOTS_DIR to write screenshots"),
]

PHONE = {"width": 390, "height": 780, "is_mobile": True, "has_touch": True}

CONVERSATION = [
    ("caster_kim", 14, "Welcome back to the Grand Final! Map 3, series tied 1-1"),
    ("nova_fan", 13, "LETS GO NOVA"),
    ("nova_fan", 13, "that flank on B was insane"),
    ("arcadia4life", 11, "Arcadia always wins the third map, watch"),
    ("bob", 9, "@alice are you watching from the venue?"),
    ("alice", 8, "yes! row F, the sound in here is unreal"),
    ("pixelpanda", 6, "who's on the mic for Nova today?"),
    ("caster_kim", 5, "Reminder: the prediction poll closes when the round starts"),
    ("arcadia4life", 3, "clutch 1v3 from Zeph!!"),
    ("bob", 2, "ok that was clean"),
    ("pixelpanda", 1, "<b>not bold</b> because everything here is plain text"),
]


def _shot(page: Page, name: str) -> None:
    assert OUT is not None
    Path(OUT).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(OUT) / f"{name}.png"))


def test_screenshots(chat: Chat, make_user: Any, make_room: Any) -> None:
    """Room list, a busy room, a phone, a guest, a moderator's menu, and a reconnect."""
    final = make_room("grand-final", title="Grand Final · Nova vs Arcadia")
    make_room("lobby", title="Lobby")
    make_room("eu-qualifiers", title="EU Qualifiers")
    team = make_room("team-nova", title="Team Nova", is_public=False)
    users = {name: make_user(name)[0] for name in {n for n, _, _ in CONVERSATION} | {"mod"}}
    users["mod"].is_superuser = True
    users["mod"].save()
    team.members.add(users["alice"])
    now = timezone.now()
    Message.objects.bulk_create(
        Message(room=final, author=users[name], body=body, created=now - timedelta(minutes=ago))
        for name, ago, body in CONVERSATION
    )

    alice = chat.open_room("grand-final", user="alice")
    bob = chat.open_room("grand-final", user="bob", **PHONE)
    expect(messages(alice)).to_have_count(len(CONVERSATION))

    rooms = alice.context.new_page()
    rooms.set_viewport_size({"width": 1100, "height": 560})
    rooms.goto(chat.url("/"))
    expect(rooms.locator(".room-card")).to_have_count(4)
    _shot(rooms, "rooms")

    bob.type("#body", "no way they lose this")
    expect(alice.locator("#typing")).to_have_text("bob is typing…")
    _shot(alice, "room")
    _shot(bob, "phone")

    guest = chat.open_room("grand-final", height=620)
    _shot(guest, "anonymous")

    mod = chat.open_room("grand-final", user="mod")
    if "is-mod" in (mod.locator("#chat").get_attribute("class") or ""):
        target = messages(mod, "clutch 1v3")
        target.hover()
        target.locator(".mod-toggle").click()
        expect(mod.locator("#modmenu")).to_be_visible()
        _shot(mod, "moderator")

    login = chat.page(height=620)
    login.goto(chat.url("/accounts/login/?next=/"))
    _shot(login, "login")

    chat.server.kill()
    expect(alice.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    alice.fill("#body", "did the stream just drop?")
    alice.press("#body", "Enter")
    expect(messages(alice, "stream just drop").locator(".msg-status")).to_have_text("sending…")
    alice.mouse.move(0, 0)
    _shot(alice, "reconnecting")
