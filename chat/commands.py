"""In-chat moderator commands: `/delete`, `/timeout`, `/ban`, `/unban`, `/slow`, `/readonly`,
`/clear`. Parsing only; chat.services.command_run carries them out.

A message whose first word is one of these names is a command and is never posted as chat,
whoever sends it. Anything else starting with "/" is ordinary chat.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.errors import ChatError
from chat.models import SLOW_MODE_MAX_SECONDS
from chat.protocol import ErrorCode

MAX_TIMEOUT_SECONDS = 14 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Delete:
    message_id: int
    name = "delete"


@dataclass(frozen=True, slots=True)
class Timeout:
    username: str
    seconds: int
    reason: str
    name = "timeout"


@dataclass(frozen=True, slots=True)
class Ban:
    username: str
    reason: str
    name = "ban"


@dataclass(frozen=True, slots=True)
class Unban:
    username: str
    name = "unban"


@dataclass(frozen=True, slots=True)
class Slow:
    seconds: int
    name = "slow"


@dataclass(frozen=True, slots=True)
class ReadOnly:
    enabled: bool
    name = "readonly"


@dataclass(frozen=True, slots=True)
class Clear:
    name = "clear"


Command = Delete | Timeout | Ban | Unban | Slow | ReadOnly | Clear

USAGE = {
    "delete": "/delete <message id>",
    "timeout": "/timeout <user> <seconds> [reason]",
    "ban": "/ban <user> [reason]",
    "unban": "/unban <user>",
    "slow": f"/slow <seconds 0-{SLOW_MODE_MAX_SECONDS}>",
    "readonly": "/readonly on|off",
    "clear": "/clear",
}


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _usage(name) from None
    if not low <= value <= high:
        raise _usage(name)
    return value


def _usage(name: str) -> ChatError:
    return ChatError(ErrorCode.BAD_COMMAND, f"usage: {USAGE[name]}")


def name_of(body: str) -> str | None:
    """The command name if this body is a command, else None."""
    if not body.startswith("/"):
        return None
    name = body[1:].split(maxsplit=1)[0].lower() if len(body) > 1 else ""
    return name if name in USAGE else None


def parse(body: str) -> Command | None:
    """The command in a message body, None for ordinary chat; ChatError for a malformed one."""
    body = body.strip()
    name = name_of(body)
    if name is None:
        return None
    words = body.split()
    args = words[1:]
    match name:
        case "delete" if len(args) == 1:
            return Delete(message_id=_int(args[0].lstrip("#"), name, 1, 2**63 - 1))
        case "timeout" if len(args) >= 2:
            seconds = _int(args[1], name, 1, MAX_TIMEOUT_SECONDS)
            return Timeout(username=args[0], seconds=seconds, reason=" ".join(args[2:]))
        case "ban" if len(args) >= 1:
            return Ban(username=args[0], reason=" ".join(args[1:]))
        case "unban" if len(args) == 1:
            return Unban(username=args[0])
        case "slow" if len(args) == 1:
            return Slow(seconds=_int(args[0], name, 0, SLOW_MODE_MAX_SECONDS))
        case "readonly" if len(args) == 1 and args[0].lower() in ("on", "off"):
            return ReadOnly(enabled=args[0].lower() == "on")
        case "clear" if not args:
            return Clear()
    raise _usage(name)
