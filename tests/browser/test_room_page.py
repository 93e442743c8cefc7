"""The room page in Chromium: live messages, history, local times, mentions, safe text."""

from __future__ import annotations

import re
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone
from playwright.sync_api import Dialog, Page, expect

from chat.models import Message
from tests.browser.pages import Chat, messages, send

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_two_players_see_each_others_messages_live(
    chat: Chat, make_user: Any, make_room: Any
) -> None:
    """What one player types shows as 'typing' on the other's page; what they send shows
    up there at once, and once."""
    make_room("final", title="Grand Final")
    make_user("alice")
    make_user("bob")
    alice = chat.open_room("final", user="alice")
    bob = chat.open_room("final", user="bob", width=390, height=700)  # on a phone

    alice.type("#body", "glhf")
    expect(bob.locator("#typing")).to_have_text("alice is typing…")
    expect(alice.locator("#typing")).to_have_text("")  # nobody is told about themselves
    alice.type("#body", " everyone")
    alice.press("#body", "Enter")
    expect(messages(bob, "glhf everyone")).to_have_count(1)
    expect(bob.locator("#typing")).to_have_text("")  # the message ends the typing hint
    expect(messages(bob, "glhf everyone").locator(".author")).to_have_text("alice")
    send(bob, "gg @alice")
    expect(messages(alice, "gg @alice")).to_have_count(1)
    # Alice's own mention is highlighted on her page, not on Bob's.
    expect(messages(alice, "gg @alice")).to_have_class(re_class("mentions-me"))
    expect(messages(alice, "gg @alice").locator("mark.mention")).to_have_text("@alice")
    expect(messages(bob, "gg @alice")).not_to_have_class(re_class("mentions-me"))
    # Each side sees both messages exactly once, its own included (no optimistic copy left).
    for page in (alice, bob):
        expect(messages(page)).to_have_count(2)
        expect(page.locator("#messages li.pending")).to_have_count(0)

    # While Bob's tab is in the background, its title counts what he has not seen.
    title = bob.title()
    _set_hidden(bob, True)
    send(alice, "you there?")
    send(alice, "bob??")
    expect(bob).to_have_title(f"(2) {title}")
    _set_hidden(bob, False)
    expect(bob).to_have_title(title)


def test_late_joiner_sees_history_in_local_time(chat: Chat, make_user: Any, make_room: Any) -> None:
    """A page opened later shows earlier messages, stamped in the viewer's own time zone."""
    make_room("final")
    make_user("alice")
    make_user("carol")
    alice = chat.open_room("final", user="alice")
    for body in ("first", "second", "third"):
        send(alice, body)
    expect(alice.locator("#messages li.msg[data-id]")).to_have_count(3)

    carol = chat.open_room("final", user="carol", locale="en-GB", timezone_id="Asia/Kolkata")
    expect(messages(carol)).to_have_count(3)
    expect(carol.locator("#messages .body")).to_have_text(["first", "second", "third"])
    first = Message.objects.get(body="first")
    local = first.created.astimezone(ZoneInfo("Asia/Kolkata"))
    expect(messages(carol, "first").locator("time")).to_have_text(
        re.compile(rf"^0?{local.hour}:{local.minute:02d}$")
    )
    expect(messages(carol, "first").locator("time")).to_have_attribute(
        "datetime",
        re.compile(rf"^{first.created:%Y-%m-%dT%H:%M}"),  # the instant, in UTC
    )


def test_scrolling_up_loads_older_messages(chat: Chat, make_user: Any, make_room: Any) -> None:
    """Older messages than the first page arrive when the player scrolls to the top."""
    room = make_room("final")
    alice, _ = make_user("alice")
    make_user("bob")
    Message.objects.bulk_create(
        Message(room=room, author=alice, body=f"old {i}", created=timezone.now()) for i in range(80)
    )
    bob = chat.open_room("final", user="bob")
    expect(messages(bob)).to_have_count(50)
    bob.locator("#scroller").evaluate("el => { el.scrollTop = 0; }")
    expect(messages(bob)).to_have_count(80)
    expect(bob.locator("#messages .body").first).to_have_text("old 0")
    expect(bob.locator("#older")).to_have_text("This is the beginning of #final.")


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(
    chat: Chat, make_user: Any, make_room: Any
) -> None:
    """A body full of HTML is displayed literally; no element is created, no script runs."""
    make_room("final")
    make_user("mallory")
    make_user("bob")
    mallory = chat.open_room("final", user="mallory")
    bob = chat.open_room("final", user="bob")
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    for page in (mallory, bob):
        page.on("dialog", on_dialog)
    attack = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    send(mallory, attack)
    expect(messages(bob, "<img src=x")).to_have_count(1)
    expect(messages(bob, "<img src=x").locator(".body")).to_have_text(attack)
    for page in (mallory, bob):
        assert page.locator("#messages img, #messages script").count() == 0
    bob.wait_for_timeout(300)  # give a would-be onerror handler its chance to fire
    assert dialogs == []
    response = bob.request.get(chat.url("/rooms/final/"))
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy


def test_anonymous_visitor_reads_and_is_invited_to_log_in(
    chat: Chat, make_user: Any, make_room: Any
) -> None:
    """A visitor who is not logged in reads a public room live and sees a login prompt,
    on a phone-width screen without sideways scrolling."""
    make_room("final")
    make_user("alice")
    alice = chat.open_room("final", user="alice")
    guest = chat.open_room("final", width=390, height=700)  # a phone
    expect(guest.locator("#composer")).to_have_count(0)
    expect(guest.locator(".login-prompt")).to_be_in_viewport()
    assert guest.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(guest.locator(".login-prompt a")).to_have_text("Log in to chat")
    send(alice, "hello readers")
    expect(messages(guest, "hello readers")).to_have_count(1)
    guest.click(".login-prompt a")
    guest.wait_for_url("**/accounts/login/?next=/rooms/final/")


def re_class(name: str) -> re.Pattern[str]:
    """Matches a class attribute that has `name` among its classes."""
    return re.compile(rf"(^|\s){re.escape(name)}(\s|$)")


def _set_hidden(page: Page, hidden: bool) -> None:
    """Play the tab going to the background (or back), as the Page Visibility API reports."""
    page.evaluate(
        """hidden => {
            Object.defineProperty(document, "hidden", { value: hidden, configurable: true });
            Object.defineProperty(document, "visibilityState", {
                value: hidden ? "hidden" : "visible", configurable: true,
            });
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


def test_login_errors_and_logout(chat: Chat, make_user: Any, make_room: Any) -> None:
    """A wrong password is refused with a message; logging out returns to the rooms as a
    guest."""
    make_room("final")
    make_user("alice")
    page = chat.page()
    page.goto(chat.url("/accounts/login/?next=/rooms/final/"))
    page.fill("#id_username", "alice")
    page.fill("#id_password", "not-her-password")
    page.click("form.login-form button[type=submit]")
    expect(page.locator(".form-error")).to_contain_text("correct username and password")
    expect(page.locator("#id_username")).to_have_value("alice")

    page = chat.open_room("final", user="alice")
    expect(page.locator(".who-name")).to_have_text("alice")
    page.click("text=Log out")
    page.wait_for_url(chat.url("/"))
    expect(page.locator(".account")).to_contain_text("Log in")
