"""ASGI entry point of the naive baseline (see bench/naive/__init__.py)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.naive.settings")

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from django.urls import path

django_application = get_asgi_application()

from bench.naive.consumers import NaiveChatConsumer  # noqa: E402

websocket_urlpatterns = [path("ws/chat/", NaiveChatConsumer.as_asgi())]  # type: ignore[arg-type]

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": URLRouter(websocket_urlpatterns),  # type: ignore[arg-type]
    }
)
