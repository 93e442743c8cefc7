"""The per-process Prometheus endpoint: each server process serves its own /metrics.

Behind a load balancer, /metrics on the web port would reach whichever process the balancer
picks; Prometheus must scrape every process, so each one listens on CHAT_METRICS_PORT (set
differently per process) as well. Started from the ASGI entry point only, so management
commands never open a port.
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from prometheus_client import start_http_server

logger = logging.getLogger(__name__)

_started = threading.Lock()
_port: int | None = None


def start_from_settings() -> int | None:
    """Start the exporter once per process if CHAT_METRICS_PORT is set; returns the port."""
    global _port
    port = settings.CHAT_METRICS_PORT
    if not port:
        return None
    with _started:
        if _port is None:
            start_http_server(port, addr=settings.CHAT_METRICS_ADDR)
            _port = port
            logger.info("metrics: serving /metrics on %s:%d", settings.CHAT_METRICS_ADDR, port)
    return _port
