"""The one error type of the service's request handling (no framework here: the protocol code raises it too)."""
from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses: answered ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
