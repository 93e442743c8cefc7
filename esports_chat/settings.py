"""Settings for esports_chat: the only module that reads the environment.

Every value has a safe default for local use (SQLite, the in-memory channel layer)
except DJANGO_SECRET_KEY, which is required once DJANGO_DEBUG is off. The full list,
with defaults, is in .env.example and docs/operations.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_str(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def _env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ImproperlyConfigured(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- Django core -----------------------------------------------------------------------------

DEBUG = _env_bool("DJANGO_DEBUG", True)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is false")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"

ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
# A cookie-authenticated socket must come from a page of the host it connects to (Origin
# equal to the Host header). These origins are allowed too, for example a separate
# front-end host: scheme, host and port, exactly as the browser sends them.
CHAT_ALLOWED_ORIGINS = _env_list("CHAT_ALLOWED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "channels",
    "chat",
    "monitoring",
]

MIDDLEWARE = [
    "monitoring.middleware.HealthCheckMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "chat.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "esports_chat.urls"
ASGI_APPLICATION = "esports_chat.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database --------------------------------------------------------------------------------

DATABASE_URL = _env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}")
# Each process runs its database work on one thread (Channels' and Django's thread-sensitive
# executor), so a connection kept open is one per process, not one per request; opening one
# per call costs a TCP connect and authentication on PostgreSQL every time. 0 closes it after
# every call; health checks replace a connection the database dropped meanwhile.
DATABASE_CONN_MAX_AGE = _env_int("DATABASE_CONN_MAX_AGE", 300, minimum=0)
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=DATABASE_CONN_MAX_AGE, conn_health_checks=True
    )
}
# django-prometheus's wrappers of the same engines count queries and errors per process.
_INSTRUMENTED = {
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
    "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
}
DATABASES["default"]["ENGINE"] = _INSTRUMENTED.get(
    DATABASES["default"]["ENGINE"], DATABASES["default"]["ENGINE"]
)
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # WAL lets readers (history, joins) proceed while a post is being written.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    )
    # A file, not memory: tests start real server processes on the same database. One per
    # test run, so concurrent runs on one machine do not destroy each other's.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / f"test-{os.getpid()}.sqlite3")}
    (BASE_DIR / "var").mkdir(exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "var" / "static"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "chat:index"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# --- Redis and the channel layer -------------------------------------------------------------

# Unset: one process, the in-memory layer. Set: every process shares rooms through Redis.
REDIS_URL = _env_str("REDIS_URL", "")
# High availability: "host:port,host:port" of Redis Sentinels and the primary's name. When
# set, the layer, presence and rate limits all follow the primary the sentinels name.
REDIS_SENTINELS = [
    (host, int(port))
    for host, _, port in (item.rpartition(":") for item in _env_list("REDIS_SENTINELS", []))
]
REDIS_SENTINEL_MASTER = _env_str("REDIS_SENTINEL_MASTER", "mymaster")
CHAT_LAYER_PREFIX = _env_str("CHAT_LAYER_PREFIX", "chat")
# Seconds any single Redis call may take before it counts as failed (never hang a post).
CHAT_REDIS_TIMEOUT = _env_float("CHAT_REDIS_TIMEOUT", 2.0, minimum=0.1)


def _redis_host() -> dict[str, Any]:
    return {
        "address": REDIS_URL,
        "socket_connect_timeout": CHAT_REDIS_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry_on_timeout": False,
    }


def _sentinel_host() -> dict[str, Any]:
    timeouts = {
        "socket_timeout": CHAT_REDIS_TIMEOUT,
        "socket_connect_timeout": CHAT_REDIS_TIMEOUT,
    }
    return {
        "sentinels": REDIS_SENTINELS,
        "master_name": REDIS_SENTINEL_MASTER,
        "sentinel_kwargs": timeouts,
        "socket_connect_timeout": CHAT_REDIS_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }


CHANNEL_LAYERS: dict[str, dict[str, Any]]
if REDIS_URL or REDIS_SENTINELS:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [_sentinel_host() if REDIS_SENTINELS else _redis_host()],
                "prefix": CHAT_LAYER_PREFIX,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # The hub's one channel carries every room's traffic: size it for bursts, and keep
            # group memberships for as long as the process lives.
            "CONFIG": {"capacity": 100_000, "expiry": 60, "group_expiry": 10 * 365 * 86400},
        }
    }

# --- Chat tunables ---------------------------------------------------------------------------

CHAT_MAX_MESSAGE_LENGTH = _env_int("CHAT_MAX_MESSAGE_LENGTH", 500, minimum=1, maximum=10_000)
CHAT_MAX_FRAME_BYTES = _env_int("CHAT_MAX_FRAME_BYTES", 65_536, minimum=1024)
CHAT_HISTORY_LIMIT = _env_int("CHAT_HISTORY_LIMIT", 50, minimum=0, maximum=500)
CHAT_HISTORY_PAGE_MAX = _env_int("CHAT_HISTORY_PAGE_MAX", 100, minimum=1, maximum=1000)
CHAT_RECOVERY_LIMIT = _env_int("CHAT_RECOVERY_LIMIT", 300, minimum=1, maximum=10_000)
CHAT_TOKEN_MAX_AGE = _env_int("CHAT_TOKEN_MAX_AGE", 24 * 3600, minimum=60)
CHAT_MAX_ROOMS_PER_SOCKET = _env_int("CHAT_MAX_ROOMS_PER_SOCKET", 20, minimum=1)

# Fan-out: events for a room inside this window leave as one batch frame (0 disables).
CHAT_BATCH_WINDOW_MS = _env_int("CHAT_BATCH_WINDOW_MS", 50, minimum=0, maximum=1000)
# A room whose flushes take long here (thousands of local members) gets a window twice
# as long as its last flush took, up to this (docs/protocol.md, "Batching").
CHAT_BATCH_WINDOW_MAX_MS = _env_int("CHAT_BATCH_WINDOW_MAX_MS", 200, minimum=0, maximum=5000)
# Outbound flow control per socket, in bytes written but not yet confirmed by a pong.
CHAT_OUTBOUND_LIMIT_BYTES = _env_int("CHAT_OUTBOUND_LIMIT_BYTES", 1_048_576, minimum=16_384)
CHAT_OUTBOUND_SHED_BYTES = _env_int("CHAT_OUTBOUND_SHED_BYTES", 262_144, minimum=4096)
CHAT_FLOW_PING_BYTES = _env_int("CHAT_FLOW_PING_BYTES", 131_072, minimum=1024)
# Abuse limits, enforced across processes through Redis when it is configured.
CHAT_RATE_MESSAGES = _env_int("CHAT_RATE_MESSAGES", 20, minimum=1)
CHAT_RATE_MESSAGES_MODERATOR = _env_int("CHAT_RATE_MESSAGES_MODERATOR", 100, minimum=1)
CHAT_RATE_WINDOW_SECONDS = _env_int("CHAT_RATE_WINDOW_SECONDS", 30, minimum=1)
CHAT_REPEAT_WINDOW_SECONDS = _env_int("CHAT_REPEAT_WINDOW_SECONDS", 30, minimum=0)
CHAT_MAX_MENTIONS = _env_int("CHAT_MAX_MENTIONS", 5, minimum=0)
CHAT_MAX_COMBINING_MARKS = _env_int("CHAT_MAX_COMBINING_MARKS", 2, minimum=0)
# Frames one socket may send per 10 seconds before it is closed as a flood (4029).
CHAT_SOCKET_FRAMES_PER_10S = _env_int("CHAT_SOCKET_FRAMES_PER_10S", 300, minimum=10)

# Heartbeat: a ping every interval; a socket silent to pings for the timeout is closed.
# Freeze what the process loaded before its first socket out of the garbage collector's
# full collections, which otherwise pause the loop for 50-200 ms with thousands of sockets.
CHAT_GC_FREEZE = _env_bool("CHAT_GC_FREEZE", True)
CHAT_HEARTBEAT_INTERVAL = _env_float("CHAT_HEARTBEAT_INTERVAL", 30.0, minimum=0.05)
CHAT_HEARTBEAT_TIMEOUT = _env_float("CHAT_HEARTBEAT_TIMEOUT", 60.0, minimum=0.1)
# The hub's probe through the layer: its round trip is the pub/sub lag; without it for
# 2 intervals plus CHAT_REDIS_TIMEOUT, Redis counts as down (posts fail fast) until it
# returns, and then sockets are asked to resync over CHAT_RESYNC_SPREAD seconds.
CHAT_PROBE_INTERVAL = _env_float("CHAT_PROBE_INTERVAL", 1.0, minimum=0.05)
CHAT_RESYNC_SPREAD = _env_float("CHAT_RESYNC_SPREAD", 2.0, minimum=0.0)
# Graceful drain on SIGTERM: sockets are closed (4012, with a jittered reconnect hint of up
# to CHAT_DRAIN_RETRY_MAX_MS) spread over CHAT_DRAIN_SPREAD seconds, then the process exits.
CHAT_DRAIN_ON_SIGTERM = _env_bool("CHAT_DRAIN_ON_SIGTERM", True)
CHAT_DRAIN_SPREAD = _env_float("CHAT_DRAIN_SPREAD", 5.0, minimum=0.0)
CHAT_DRAIN_RETRY_MAX_MS = _env_int("CHAT_DRAIN_RETRY_MAX_MS", 5000, minimum=0)
# Each server process serves Prometheus metrics on its own port (0: none). Run several
# processes with different values; management commands never start the exporter.
CHAT_METRICS_PORT = _env_int("CHAT_METRICS_PORT", 0, minimum=0, maximum=65535)
CHAT_METRICS_ADDR = _env_str("CHAT_METRICS_ADDR", "127.0.0.1")
# Presence: counts are refreshed and pushed at most once per interval per room.
CHAT_PRESENCE_INTERVAL = _env_float("CHAT_PRESENCE_INTERVAL", 1.0, minimum=0.05)
CHAT_PRESENCE_TTL = _env_float("CHAT_PRESENCE_TTL", 30.0, minimum=1.0)

# --- Logging ---------------------------------------------------------------------------------

LOG_LEVEL = _env_str("DJANGO_LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Daphne logs one line per HTTP request and socket at INFO; keep the server quiet.
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}
