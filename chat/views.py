"""HTTP views: the chat pages and the socket-token API. Thin: one selector or service each."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from chat import presence, selectors
from chat.auth import token_issue


def _user_id(request: HttpRequest) -> int | None:
    return request.user.pk if request.user.is_authenticated else None


def _room_listing(request: HttpRequest) -> list[dict[str, Any]]:
    """The rooms this visitor may join, with their online counts."""
    rooms = selectors.room_list_visible(user_id=_user_id(request))
    online = presence.online_counts([room.id for room in rooms])
    return [{"room": room, "online": online.get(room.id, 0)} for room in rooms]


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html", {"rooms": _room_listing(request)})


@require_GET
def room(request: HttpRequest, slug: str) -> HttpResponse:
    listing = _room_listing(request)
    info = next((entry["room"] for entry in listing if entry["room"].slug == slug), None)
    if info is None:
        raise Http404("no such room")
    return render(
        request,
        "chat/room.html",
        {"room": info, "rooms": listing, "max_body": settings.CHAT_MAX_MESSAGE_LENGTH},
    )


def _error(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": code, "detail": detail}, status=status)


@csrf_exempt  # credentials in the body, no cookie is trusted here
@require_POST
def token(request: HttpRequest) -> JsonResponse:
    """POST username and password (JSON or form) -> a signed socket token."""
    if request.content_type == "application/json":
        try:
            payload = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return _error(400, "bad_request", "the body is not valid JSON")
        if not isinstance(payload, dict):
            return _error(400, "bad_request", "the body must be a JSON object")
    else:
        payload = request.POST.dict()
    username, password = payload.get("username"), payload.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        return _error(400, "bad_request", "username and password are required strings")
    user = authenticate(request, username=username, password=password)
    if user is None or not user.is_active:
        return _error(401, "invalid_credentials", "wrong username or password")
    return JsonResponse(
        {
            "token": token_issue(user_id=user.pk, username=user.get_username()),
            "user": user.get_username(),
            "expires_in": settings.CHAT_TOKEN_MAX_AGE,
        }
    )
