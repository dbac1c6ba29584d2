"""Exceptions that carry data, so callers can count, report and test them precisely."""

from __future__ import annotations


class VisionStreamError(Exception):
    """Base class of every error this package raises on purpose."""


class ProtocolError(VisionStreamError):
    """The peer broke the wire protocol; `code` goes into the error message sent back.

    `fatal` errors leave the byte stream in an unknown state, so the connection must close.
    """

    code: str = "protocol_error"
    fatal: bool = True

    def __init__(self, message: str, *, code: str | None = None, fatal: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if fatal is not None:
            self.fatal = fatal


class FrameTooLarge(ProtocolError):
    """A length prefix announced more bytes than the limit; raised before the payload is read."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class MalformedMessage(ProtocolError):
    """The payload is not a msgpack map (or not msgpack at all)."""

    code = "malformed"


class InvalidMessage(ProtocolError):
    """A well-formed map whose fields are missing, mistyped or out of range.

    Not fatal: framing is intact, so the connection can carry on after an error reply.
    """

    code = "invalid_message"
    fatal = False


class ModelLoadError(VisionStreamError):
    """The model could not be loaded (missing file, missing package, bad format)."""


class ConfigError(VisionStreamError):
    """A flag combination or value that cannot work, reported as one line at start-up."""
