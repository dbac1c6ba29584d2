"""The wire: framing, limits, every message builder, and the one error tree (no sockets)."""
