"""Typed errors that cross the engine's boundary (the router maps them to HTTP 4xx)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; `param` names the culprit (OpenAI's error `param`)."""

    http_status = 400  # how it reaches the client (engine.messages.WorkerError.of)

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
