"""Health probes answered before anything else, whatever Host they carry.

Orchestrators probe a process by its address (`Host: 10.1.2.3:8000`), which is not and
should not be in ALLOWED_HOSTS; Django's host check would answer 400. /healthz and /readyz
reveal nothing and change nothing, so they are served here, ahead of that check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from monitoring import views


class HealthCheckMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path == "/healthz":
            return views.healthz(request)
        if request.path == "/readyz":
            return await views.readyz(request)
        return await self.get_response(request)
