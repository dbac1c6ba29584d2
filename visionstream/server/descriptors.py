"""File descriptors: raise the soft limit to the hard one, and check that the configured caps fit in it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from visionstream.server.config import ServerConfig
from visionstream.server.tls import MAX_TLS_HANDSHAKES
from visionstream.wire.errors import DescriptorBudgetError

log = logging.getLogger("visionstream.server")

# Both listeners listen() with this backlog. It is also about how many sockets one loop turn may
# accept on a listener before any of them can be refused, so each listener costs this many more.
LISTEN_BACKLOG: Final = 128
# Everything that is not a client: model files while they load, log files, the listeners, epoll,
# the loop's self-pipe, psutil's /proc reads, OpenVINO/PyTorch/CUDA handles per lane. A loaded server
# with 2 workers holds about 20 (docs/RELIABILITY.md); CUDA alone can open dozens of /dev/nvidia*.
FD_RESERVE: Final = 128


@dataclass(frozen=True)
class DescriptorBudget:
    """What the caps need, part by part, so the refusal can say which flag to lower."""

    parts: tuple[tuple[str, int], ...]

    @property
    def needed(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{n} {what}" for what, n in self.parts)


def budget(cfg: ServerConfig) -> DescriptorBudget:
    """Descriptors the configuration may hold at once: every seat full, every backlog just accepted."""
    return DescriptorBudget((
        (f"frame clients (--max-clients {cfg.max_clients})", cfg.max_clients),
        (f"frame connections before their hello (--max-pending {cfg.max_pending})", cfg.max_pending),
        (f"HTTP connections (--max-http-clients {cfg.max_http_clients})", cfg.max_http_clients),
        (f"just-accepted sockets (2 listeners x backlog {LISTEN_BACKLOG})", 2 * LISTEN_BACKLOG),
        ("reserve for models, logs and listeners", FD_RESERVE),
    ) + ((("TLS handshakes in progress", MAX_TLS_HANDSHAKES),) if cfg.tls_cert is not None else ()))


def raise_nofile_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after) soft limits, None without `resource`."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise or check
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit below an infinite hard one
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            target = soft
    return soft, target


def check_descriptors(cfg: ServerConfig) -> None:
    """Raise the soft limit, then refuse (DescriptorBudgetError, one line) if the caps cannot fit in it."""
    limits = raise_nofile_limit()
    if limits is None:
        return
    before, available = limits
    need = budget(cfg)
    if need.needed > available:
        raise DescriptorBudgetError(need.needed, available, need.describe())
    if available != before:
        log.info("open-file limit raised from %d to %d (the caps need at most %d)", before, available, need.needed)
