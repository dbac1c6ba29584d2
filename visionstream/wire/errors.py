"""Every exception the package raises on purpose, one flat tree; they carry data to count, report and test by."""

from __future__ import annotations


class VisionStreamError(Exception):
    """Base class of every error this package raises on purpose."""


# --------------------------------------------------------------------------- the wire


class ProtocolError(VisionStreamError):
    """The peer broke the wire protocol; `code` goes into the error message sent back.

    Only FrameTooLarge loses the framing: the decoder raises it (and again on every later feed)
    and the connection closes. The others arrive in-band, framing intact.
    """

    code: str = "protocol_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


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

    Framing is intact, so the connection can carry on after an error reply.
    """

    code = "invalid_message"


# --------------------------------------------------------------------------- the server


class DecodeError(VisionStreamError, ValueError):
    """The frame's bytes are not a usable image; the message goes back to the client."""

    code: str = "decode_error"


class TooManyPixels(DecodeError):
    """The image header announces more than --max-pixels (counting what its decoder really holds);
    raised before any pixel is allocated."""

    code = "too_many_pixels"

    def __init__(self, width: int, height: int, cost: int, limit: int) -> None:
        extra = "" if cost == width * height else f", decoded as costly as {cost}"
        super().__init__(f"image of {width}x{height} = {width * height} pixels{extra} exceeds the limit of "
                         f"{limit} pixels (--max-pixels)")
        self.width = width
        self.height = height
        self.cost = cost
        self.limit = limit


class ModelLoadError(VisionStreamError):
    """The model could not be loaded (missing file, missing package, bad format)."""


class ModelNotFound(ModelLoadError):
    """The weights named by --model are not on disk and could not be fetched; only the default name
    then falls back to placeholder mode."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"cannot load --model {model}: {reason}")
        self.model = model
        self.reason = reason


class ClusterUnavailable(VisionStreamError):
    """--executor ray: the Ray cluster cannot be reached or cannot place the actors; raised at start-up."""


class ConfigError(VisionStreamError):
    """A flag combination or value that cannot work, reported as one line at start-up."""


class PortUnavailable(ConfigError):
    """A listener cannot bind its port (in use, privileged, no such address); raised before anything loads."""

    def __init__(self, flag: str, port: int, role: str, host: str, reason: str) -> None:
        super().__init__(f"cannot start: {flag} {port} ({role}) {reason} on {host}")
        self.flag = flag
        self.port = port
        self.host = host
        self.reason = reason


class DescriptorBudgetError(ConfigError):
    """The caps could hold more file descriptors at once than the process may open."""

    def __init__(self, needed: int, available: int, parts: str) -> None:
        super().__init__(f"the configured caps may need {needed} open files ({parts}) but this process may "
                         f"open only {available} (RLIMIT_NOFILE, raised to its hard limit): lower the caps "
                         f"or raise the limit (ulimit -n, LimitNOFILE=)")
        self.needed = needed
        self.available = available


# --------------------------------------------------------------------------- clients and tools


class ClientError(VisionStreamError):
    """A client-side failure worth one clear line to the user (unreachable, refused, closed)."""


class WatchError(VisionStreamError):
    """Watching cannot continue: auth refused, bad URL, or the retry budget is spent."""


class SourceError(VisionStreamError):
    """A source that cannot deliver frames; the message is the one line the user sees."""


class DisplayError(VisionStreamError):
    """No window can be opened, or the output video cannot be written."""


class ServerStartError(VisionStreamError, RuntimeError):
    """server.py exited or never became ready; the message ends with its log tail."""


class ServerUnreachable(ClientError):
    """No connection (refused, timed out, reset, closed during hello): the server may be back later."""

    def __init__(self, message: str, *, address: str, reason: str) -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


class HelloRefused(ClientError):
    """The server answered hello with an error; `code` tells whether trying again could help."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class WrongPort(ClientError):
    """The port speaks another protocol than the client's: HTTP on the frame port, or not HTTP on the API port."""

    def __init__(self, message: str, *, address: str, protocol: str) -> None:
        super().__init__(message)
        self.address = address
        self.protocol = protocol
