"""Screenshots of the moderation tools for docs/moderation.md (docs/screenshots/admin-*.png).

Not a test: a script. Run it from the repository root:

    .venv/bin/python tests/browser/admin_screenshots.py

It makes a throwaway SQLite database, migrates it, seeds rooms, players, messages and a
moderator in the Moderators group, and does some moderation through chat.services (so the
moderation log and the sanctions are real). Then it starts its own Daphne on a free
loopback port, logs in through the site's login page with Playwright driving the system
Chromium, and saves the pictures. Nothing outside the temporary directory and
docs/screenshots/ is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "screenshots"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDTH, HEIGHT = 1280, 800
PASSWORD = "screenshots-only-not-a-secret"
MODERATOR = "mod_maya"
SPAMMER = "spammer99"

# (author, minutes ago, body) in the grand final; the spammer's lines get moderated.
CONVERSATION = [
    ("caster_kim", 42, "Welcome back to the Grand Final! Map 3, series tied 1-1"),
    ("nova_fan", 40, "LETS GO NOVA"),
    ("arcadia4life", 38, "Arcadia always wins the third map, watch"),
    (SPAMMER, 36, "FREE SKINS at totally-legit-skins.example click now"),
    (SPAMMER, 36, "FREE SKINS at totally-legit-skins.example click now!!"),
    ("pixelpanda", 33, "who's on the mic for Nova today?"),
    (SPAMMER, 31, "free skins free skins free skins"),
    ("bob", 27, "@nova_fan are you watching from the venue?"),
    ("nova_fan", 25, "yes! row F, the sound in here is unreal"),
    ("troll42", 22, "this team is garbage and so are its fans"),
    ("arcadia4life", 18, "clutch 1v3 from Zeph!!"),
    ("pixelpanda", 12, "that flank on B was insane"),
    ("bob", 6, "ok that was clean"),
    ("caster_kim", 3, "Map 4 starts in five minutes, stay hydrated"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daphne exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def seed() -> dict[str, int]:
    """Migrate the throwaway database and fill it; returns ids the screenshots need."""
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.utils import timezone

    from chat import services
    from chat.models import Message, Room, Sanction

    call_command("migrate", verbosity=0, interactive=False)
    users = get_user_model()
    moderator = users.objects.create_user(username=MODERATOR, password=PASSWORD, is_staff=True)
    moderator.groups.add(Group.objects.get(name="Moderators"))
    players = {
        name: users.objects.create_user(username=name, password=PASSWORD)
        for name in sorted({name for name, _, _ in CONVERSATION} | {"zeph_watcher"})
    }

    final = Room.objects.create(slug="grand-final", title="Grand Final · Nova vs Arcadia")
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    qualifiers = Room.objects.create(slug="eu-qualifiers", title="EU Qualifiers")
    Room.objects.create(slug="team-nova", title="Team Nova", is_public=False)

    now = timezone.now()
    Message.objects.bulk_create(
        Message(room=final, author=players[name], body=body, created=now - timedelta(minutes=ago))
        for name, ago, body in CONVERSATION
    )
    Message.objects.bulk_create(
        Message(room=qualifiers, author=players[name], body=body, created=now - timedelta(hours=h))
        for name, h, body in [
            ("bob", 26, "who made it through group B?"),
            ("nova_fan", 25, "Nova 2-0, easy"),
            ("troll42", 25, "rigged"),
        ]
    )
    Message.objects.bulk_create(
        Message(room=lobby, author=players[name], body=body, created=now - timedelta(hours=h))
        for name, h, body in [
            ("zeph_watcher", 5, "anyone got the stream link?"),
            ("caster_kim", 4, "The stream link is on the event page"),
        ]
    )

    # Moderation through the services, as the admin and the chat commands do it.
    mod = moderator.pk
    spam = list(
        Message.objects.filter(room=final, author=players[SPAMMER])
        .order_by("id")
        .values_list("id", flat=True)
    )
    services.message_delete_many(actor_id=mod, message_ids=spam[:2], via="chat")
    services.sanction_apply(
        actor_id=mod,
        target_id=players[SPAMMER].pk,
        kind=Sanction.Kind.TIMEOUT,
        room_id=final.pk,
        duration_s=3600,
        reason="spam links",
        via="chat",
    )
    services.sanction_apply(
        actor_id=mod,
        target_id=players["troll42"].pk,
        kind=Sanction.Kind.BAN,
        room_id=None,
        duration_s=None,
        reason="insults in several rooms",
        via="admin",
    )
    services.sanction_apply(
        actor_id=mod,
        target_id=players["pixelpanda"].pk,
        kind=Sanction.Kind.TIMEOUT,
        room_id=final.pk,
        duration_s=600,
        reason="from admin (timeout)",
        via="admin",
    )
    services.sanction_lift(
        actor_id=mod, target_id=players["pixelpanda"].pk, room_id=final.pk, via="admin"
    )
    services.room_set_rules(actor_id=mod, room_id=final.pk, via="chat", slow_mode=10)
    services.room_set_rules(actor_id=mod, room_id=lobby.pk, via="admin", read_only=True)
    services.room_clear(actor_id=mod, room_id=qualifiers.pk, via="admin", reason="")
    return {"final": final.pk}


def log_in(page: Any, base: str, username: str, next_path: str) -> None:
    """Log in through the site's own login page, as a person does."""
    page.goto(f"{base}/accounts/login/?next={next_path}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("form.login-form button[type=submit]")
    page.wait_for_url(f"{base}{next_path}")


def shoot(base: str, ids: dict[str, int]) -> list[Path]:
    from playwright.sync_api import ViewportSize, expect, sync_playwright

    viewport: ViewportSize = {"width": WIDTH, "height": HEIGHT}

    saved: list[Path] = []

    def save(page: Any, name: str, *, full_page: bool = False) -> None:
        path = OUT / f"admin-{name}.png"
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(path), full_page=full_page)
        saved.append(path)

    def open_actions(page: Any) -> None:
        # A native drop-down does not show in a screenshot: show its options as a list.
        page.evaluate(
            """() => {
                const select = document.querySelector("select[name=action]");
                select.size = select.options.length;
                select.style.height = "auto";
            }"""
        )

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            mod = browser.new_context(viewport=viewport).new_page()
            log_in(mod, base, MODERATOR, "/admin/")
            # Fold the admin's navigation sidebar (remembered by the browser) to give the
            # lists their full width.
            mod.goto(f"{base}/admin/chat/message/")
            mod.click("#toggle-nav-sidebar")

            # Messages: a search for the spammer, newest first, all selected, actions open.
            mod.goto(f"{base}/admin/chat/message/?q={SPAMMER}&o=-1")
            rows = mod.locator("#result_list tbody tr").filter(has_text=SPAMMER)
            for index in range(rows.count()):
                rows.nth(index).locator("input.action-select").check()
            open_actions(mod)
            save(mod, "messages")

            mod.goto(f"{base}/admin/chat/room/")
            mod.locator("#result_list tbody tr").filter(has_text="grand-final").locator(
                "input.action-select"
            ).check()
            open_actions(mod)
            save(mod, "rooms")

            mod.goto(f"{base}/admin/chat/room/{ids['final']}/change/")
            expect(mod.locator("#id_slow_mode_seconds")).to_have_value("10")
            save(mod, "room", full_page=True)

            mod.goto(f"{base}/admin/chat/sanction/")
            save(mod, "sanctions")

            mod.goto(f"{base}/admin/chat/sanction/add/")
            save(mod, "sanction-add")

            mod.goto(f"{base}/admin/chat/moderationlog/")
            save(mod, "log")

            # The chat page as the moderator: the menu of one player's message.
            mod.goto(f"{base}/rooms/grand-final/")
            expect(mod.locator("#chat")).to_have_class(re.compile(r"\bis-mod\b"))
            target = (
                mod.locator("#messages li.msg")
                .filter(has=mod.locator(".body", has_text="clutch 1v3"))
                .first
            )
            target.hover()
            target.locator(".mod-toggle").click()
            expect(mod.locator("#modmenu")).to_be_visible()
            save(mod, "chat-menu")

            # What the timed-out player sees when opening the room.
            player = browser.new_context(viewport=viewport).new_page()
            log_in(player, base, SPAMMER, "/rooms/grand-final/")
            player.wait_for_selector("#banner:not([hidden]), .toast")
            player.wait_for_timeout(300)
            save(player, "chat-timed-out")
        finally:
            browser.close()
    return saved


def main() -> int:
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="chat-admin-shots-"))
    # One in-memory server process on the throwaway database, for this process and Daphne.
    for key in ("REDIS_URL", "REDIS_SENTINELS", "DJANGO_ALLOW_ASYNC_UNSAFE"):
        os.environ.pop(key, None)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "esports_chat.settings",
            "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
            "DJANGO_DEBUG": "true",  # Daphne serves the admin's static files itself
            "CHAT_METRICS_PORT": "0",
        }
    )
    env = dict(os.environ)
    server: subprocess.Popen[bytes] | None = None
    try:
        ids = seed()
        port = free_port()
        with (workdir / "daphne.log").open("wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-e",
                    f"tcp:port={port}:interface=127.0.0.1",
                    "-v",
                    "0",
                    "esports_chat.asgi:application",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(port, server)
        for path in shoot(f"http://127.0.0.1:{port}", ids):
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KiB")
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
