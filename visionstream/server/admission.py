"""Who may hold a connection: seats past the hello, a cap on pending ones, one connection per stream name."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from visionstream.server.stats import Stats


class Member(Protocol):
    """What admission needs of a connection (server.connection.ClientConnection)."""

    key: int

    def evict(self) -> None: ...

    def replace(self) -> None: ...


class Admission:
    """Event loop only. A connection starts *pending* (it has not said hello, or without a token has
    not sent its first valid message); pending connections hold no seat. At most `max_pending` may
    wait: a newer one evicts the oldest, so silent sockets cannot keep a camera that says hello at
    once from connecting. Past its hello a connection takes one of `max_clients` seats, or is refused.
    A stream name belongs to one connection: claiming it replaces the holder."""

    def __init__(self, stats: Stats, *, max_clients: int, max_pending: int) -> None:
        self.stats = stats
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.pending: OrderedDict[int, Member] = OrderedDict()  # oldest first
        self.seated: set[int] = set()
        self.names: dict[str, Member] = {}

    @property
    def full(self) -> bool:
        """Every seat is taken: a new connection is refused before it is even read."""
        return len(self.seated) >= self.max_clients

    def admit(self, conn: Member) -> None:
        """A new connection, pending; the oldest pending one is evicted when there are too many."""
        while len(self.pending) >= self.max_pending:
            _key, oldest = self.pending.popitem(last=False)
            oldest.evict()
        self.pending[conn.key] = conn
        self.stats.pending_clients = len(self.pending)

    def seat(self, conn: Member) -> bool:
        """Past its hello: take a seat (True), or there is none left (False; the caller refuses it)."""
        if conn.key in self.seated:
            return True
        if self.full:
            return False
        self.pending.pop(conn.key, None)
        self.seated.add(conn.key)
        self.stats.pending_clients = len(self.pending)
        return True

    def claim(self, name: str, conn: Member) -> None:
        """`conn` now carries stream `name`; the connection that carried it is replaced."""
        old = self.names.get(name)
        self.names[name] = conn
        if old is not None and old is not conn:
            old.replace()

    def release(self, conn: Member, name: str | None) -> None:
        """`conn` is gone (or no longer carries `name`)."""
        if self.pending.pop(conn.key, None) is not None:
            self.stats.pending_clients = len(self.pending)
        self.seated.discard(conn.key)
        if name is not None and self.names.get(name) is conn:
            del self.names[name]
