"""Settings come from the environment, strictly: clear errors, safe defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

PRINT = """
import json
from esports_chat import settings as s
layer = s.CHANNEL_LAYERS["default"]
print(json.dumps({
    "layer": layer["BACKEND"],
    "hosts": layer.get("CONFIG", {}).get("hosts"),
    "db": s.DATABASES["default"]["ENGINE"],
    "db_name": s.DATABASES["default"]["NAME"],
    "debug": s.DEBUG,
    "hosts_allowed": s.ALLOWED_HOSTS,
    "window": s.CHAT_BATCH_WINDOW_MS,
    "sentinels": s.REDIS_SENTINELS,
}, default=str))
"""


def load(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHAT_", "REDIS"))}
    clean.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-c", PRINT],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def settings_with(**env: str) -> dict[str, object]:
    result = load(**env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_defaults_are_the_embedded_setup() -> None:
    """No environment: debug on, SQLite, the in-memory layer."""
    s = settings_with()
    assert s["debug"] is True
    assert s["layer"] == "channels.layers.InMemoryChannelLayer"
    assert s["db"] == "django_prometheus.db.backends.sqlite3"
    assert s["window"] == 50


def test_secret_key_is_required_when_debug_is_off() -> None:
    result = load(DJANGO_DEBUG="false")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr
    s = settings_with(DJANGO_DEBUG="false", DJANGO_SECRET_KEY="x" * 50)
    assert s["debug"] is False


def test_redis_url_selects_the_redis_layer_and_database_url_postgres() -> None:
    s = settings_with(
        REDIS_URL="redis://127.0.0.1:6379/2",
        DATABASE_URL="postgres://chat@db.internal:5432/chat",
        DJANGO_ALLOWED_HOSTS="chat.example, www.chat.example",
    )
    assert s["layer"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert s["db"] == "django_prometheus.db.backends.postgresql" and s["db_name"] == "chat"
    assert s["hosts_allowed"] == ["chat.example", "www.chat.example"]


def test_sentinels_configure_the_layer() -> None:
    s = settings_with(REDIS_SENTINELS="10.0.0.1:26379,10.0.0.2:26380", REDIS_SENTINEL_MASTER="m")
    assert s["sentinels"] == [["10.0.0.1", 26379], ["10.0.0.2", 26380]]
    assert s["layer"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    hosts = s["hosts"]
    assert isinstance(hosts, list) and hosts[0]["master_name"] == "m"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHAT_BATCH_WINDOW_MS", "soon", "must be an integer"),
        ("CHAT_BATCH_WINDOW_MS", "-5", "must be between"),
        ("DJANGO_DEBUG", "maybe", "must be a boolean"),
        ("CHAT_REDIS_TIMEOUT", "fast", "must be a number"),
    ],
)
def test_bad_values_fail_at_startup_with_the_setting_named(
    name: str, value: str, message: str
) -> None:
    result = load(**{name: value})
    assert result.returncode != 0
    assert name in result.stderr and message in result.stderr
