"""What can go wrong with a request: a bad field (RequestError: the service answers 400 with its code and
field), a full queue (QueueFullError: 503 with Retry-After), no engine or no model (EngineUnavailableError)."""

from __future__ import annotations


class RequestError(ValueError):
    """An invalid request. `code` is machine-readable, `field` names the offending field."""

    def __init__(self, code: str, field: str | None, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def to_dict(self) -> dict:
        return {"code": self.code, "field": self.field, "message": self.message}


class QueueFullError(Exception):
    """The admission queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__(f"the engine is busy; retry in {retry_after:g}s")
        self.retry_after = retry_after


class EngineUnavailableError(Exception):
    """The engine cannot be reached or has no model loaded."""
