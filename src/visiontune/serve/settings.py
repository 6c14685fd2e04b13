"""Server settings shared by the app factory, the CLI and the benchmark."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

API_KEY_ENV = "VISIONTUNE_API_KEY"


@dataclass
class ServeSettings:
    """Tunables of ``visiontune serve`` (the CLI flags of the same names).

    Example:
        >>> ServeSettings(max_batch=8).max_body_bytes
        10485760
    """

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 10.0
    max_body_mb: float = 10.0
    # pixels an upload may have, read from its header before decoding: a 280 KB PNG of 9400x9400
    # costs seconds of CPU and gigabytes to decode (Pillow's own limit is ~179 MP)
    max_pixels: int = 40_000_000
    api_key: str | None = None
    workers_threads: int = 2
    precision: str = "auto"
    reject_below: float | None = None
    warmup: bool = True
    niceness: int = 10  # inference/decoding threads run this much below the event loop (Linux)
    # the model's name in the Open Inference Protocol's URLs (/v2/models/NAME/infer): fixed, so that
    # client code keeps working when the server is given a newly trained model
    model_name: str = "visiontune"
    # CPU runtime of a model folder (export.runtime.load_classifier): the fastest verified one by default
    backend: str = field(default_factory=lambda: os.environ.get("VISIONTUNE_BACKEND", "auto"))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (the hosts that need no API key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
