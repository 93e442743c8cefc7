"""Moderation seen from the page: deleted messages vanish live; moderators get a menu."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.test import override_settings
from django.utils import timezone
from playwright.sync_api import expect

from chat import hub, protocol, services
from chat.models import Message
from tests.browser.pages import PASSWORD, Chat, messages, send

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _in_thread(call: Any) -> None:
    """Run `call` off this thread: Playwright's event loop here leaves async_to_sync no room."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    if errors:
        raise errors[0]


def _delete(message: Message, *, moderator_id: int, server_env: dict[str, str]) -> None:
    """Delete a message as a moderator would, publishing on the servers' Redis."""
    prefix, url = server_env["CHAT_LAYER_PREFIX"], server_env["REDIS_URL"]
    layers = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [url], "prefix": prefix},
        }
    }

    def delete() -> None:
        if hasattr(services, "message_delete"):
            services.message_delete(actor_id=moderator_id, message_id=message.pk, via="admin")
            return
        Message.objects.filter(pk=message.pk).update(deleted_at=timezone.now())
        frame = protocol.delete(room=message.room.slug, id=message.pk)
        async_to_sync(hub.publish)(message.room_id, frame)

    with override_settings(REDIS_URL=url, CHAT_LAYER_PREFIX=prefix, CHANNEL_LAYERS=layers):
        channel_layers.backends.clear()
        try:
            _in_thread(delete)
        finally:
            channel_layers.backends.clear()


def test_deleted_message_disappears_from_every_page(
    chat: Chat, make_user: Any, make_room: Any, server_env: dict[str, str]
) -> None:
    """A message a moderator deletes vanishes from open pages without a reload."""
    make_room("final")
    make_user("alice")
    make_user("bob")
    moderator, _ = make_user("mod")
    moderator.is_superuser = True
    moderator.save()
    alice = chat.open_room("final", user="alice")
    bob = chat.open_room("final", user="bob")
    send(alice, "spoiler: blue side wins")
    send(alice, "this one stays")
    expect(messages(bob, "this one stays")).to_have_count(1)

    _delete(
        Message.objects.select_related("room").get(body="spoiler: blue side wins"),
        moderator_id=moderator.pk,
        server_env=server_env,
    )
    for page in (alice, bob):
        expect(messages(page, "spoiler")).to_have_count(0)
        expect(messages(page, "this one stays")).to_have_count(1)


@pytest.mark.skipif(
    not hasattr(services, "command_run"), reason="in-chat moderator commands not available"
)
def test_moderator_deletes_from_the_message_menu(
    chat: Chat, make_user: Any, make_room: Any
) -> None:
    """A moderator's page has a menu on each message: 'Delete message' removes it for all,
    'Time out 10 min' silences its author. Players get no such menu."""
    make_room("final")
    make_user("alice")
    moderator, _ = make_user("mod")
    moderator.is_superuser = True
    moderator.save()
    alice = chat.open_room("final", user="alice")
    mod = chat.open_room("final", user="mod")
    expect(mod.locator("#chat")).to_have_class("chat is-mod")
    send(alice, "buy cheap gold at example.com")
    target = messages(mod, "cheap gold")
    expect(target).to_have_count(1)
    expect(messages(alice, "cheap gold").locator(".mod-toggle")).to_be_hidden()

    target.hover()
    target.locator(".mod-toggle").click()
    mod.locator("#modmenu [data-action=delete]").click()
    for page in (alice, mod):
        expect(messages(page, "cheap gold")).to_have_count(0)
    expect(mod.locator(".toast")).to_contain_text("deleted message")

    send(alice, "why was that deleted??")
    target = messages(mod, "why was that deleted")
    target.hover()
    target.locator(".mod-toggle").click()
    mod.locator("#modmenu [data-action=timeout]").click()
    expect(alice.locator("#banner")).to_contain_text("timed out")
    expect(alice.locator("#body")).to_be_disabled()


def test_admin_works_under_the_content_security_policy(
    chat: Chat, make_user: Any, make_room: Any
) -> None:
    """Django's admin runs with the site's CSP: it logs in, lists and edits, with no
    refused script or style (the `chat` fixture fails the test on any CSP report)."""
    make_room("final")
    admin, _ = make_user("root")
    admin.is_superuser = admin.is_staff = True
    admin.save()
    page = chat.page()
    page.goto(chat.url("/admin/login/?next=/admin/"))
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()
    for path, heading in (
        ("/admin/chat/message/", "Select message"),
        ("/admin/chat/room/", "Select room"),
        ("/admin/chat/room/add/", "Add room"),
    ):
        response = page.goto(chat.url(path))
        assert response is not None
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#content h1")).to_contain_text(heading)
    # The admin's own scripts run: typing a title fills in the slug.
    page.type("#id_title", "Semi Final")
    expect(page.locator("#id_slug")).to_have_value("semi-final")
