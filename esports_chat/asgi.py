"""The ASGI application: Django for HTTP, the chat socket at /ws/chat/.

Run it with Daphne (the deployment server) or Uvicorn, for example
`daphne -e tcp:port=8000:interface=127.0.0.1:backlog=4096 esports_chat.asgi:application`.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "esports_chat.settings")

from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.core.asgi import get_asgi_application

http_application = get_asgi_application()

from chat.auth import SocketGate  # noqa: E402
from chat.routing import websocket_routes  # noqa: E402
from monitoring import exporter  # noqa: E402

exporter.start_from_settings()

if settings.DEBUG:
    # Local runs serve /static/ from the app; production puts nginx in front of collectstatic.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_application = ASGIStaticFilesHandler(http_application)

application = ProtocolTypeRouter(
    {
        "http": http_application,
        "websocket": SocketGate(websocket_routes),
    }
)
