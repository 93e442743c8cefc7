"""The error every chat action raises to refuse: it becomes an `error` frame of its code."""

from __future__ import annotations

from typing import Any

from chat.protocol import ErrorCode


class ChatError(Exception):
    """A refused action. `extra` fields (limit, retry_after_ms, expires_ms...) go on the frame."""

    def __init__(self, code: ErrorCode, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra
