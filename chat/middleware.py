"""HTTP middleware for the chat site: the Content-Security-Policy header.

The chat page renders strings typed by strangers, so a policy without inline script is the
second wall behind rendering every user string as text. The pages and Django's admin (5.2)
load scripts and styles only from files, and the socket is same-origin, so `'self'` is all
they need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "connect-src 'self' ws: wss:",
        "img-src 'self' data:",
        "style-src 'self'",
        "script-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


class ContentSecurityPolicyMiddleware:
    """Add the site's Content-Security-Policy to every response that has none of its own."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if "Content-Security-Policy" in response:
            return response
        if settings.DEBUG and response.status_code >= 400:
            # Django's debug error pages are built from inline script and style; a policy
            # would only make them unreadable for the developer looking at them.
            return response
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
