"""Settings for the naive baseline (bench.naive): Channels and a channel layer, nothing else.

    DJANGO_SETTINGS_MODULE=bench.naive.settings daphne bench.naive.asgi:application

REDIS_URL set: the tutorial's channels_redis core layer (RedisChannelLayer); unset: the
in-memory layer. BENCH_NAIVE_LAYER=pubsub selects RedisPubSubChannelLayer instead. Tokens
from `chat_loadtest` verify because DJANGO_SECRET_KEY (or the product's development default)
is the same here.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "dev-only-insecure-key-do-not-use-in-production"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
ROOT_URLCONF = "bench.naive.urls"
ASGI_APPLICATION = "bench.naive.asgi.application"
# The tutorial project keeps Django's default SQLite database; the consumer never queries it,
# but Channels (>= 4.2) still hops to a thread to close old connections before every handler.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True

REDIS_URL = os.environ.get("REDIS_URL", "")
CHANNEL_LAYERS: dict[str, dict[str, Any]]
if REDIS_URL and os.environ.get("BENCH_NAIVE_LAYER") == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
elif REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
