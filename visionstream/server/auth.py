"""The shared-secret check, one for the frame port (hello) and the HTTP listener (headers, query)."""

from __future__ import annotations

import hmac


def token_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time token check; everything passes when the server has no token."""
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
