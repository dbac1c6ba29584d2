"""The start-up check that the device asked for exists."""

from __future__ import annotations

from visionstream.wire.errors import ConfigError


def check_device(device: str) -> None:
    """Fail fast (ConfigError) when CUDA is asked for but absent, before anything starts."""
    if device == "cpu":
        return
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"--device {device} needs PyTorch, which is not installed") from exc
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available on this machine; use --device cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
