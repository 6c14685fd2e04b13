"""``ServeSettings``: every option of ``visiontune serve``, defined once.

Its fields are the command's flags (``max_batch`` is ``--max-batch``), the keywords of
:func:`visiontune.serve.server.serve` and what the app factory, the batcher and the benchmark read.

Example:
    >>> ServeSettings(max_batch=8).max_body_bytes
    10485760
    >>> ServeSettings.from_dict({"max_pixels": 12.5}).max_pixel_count
    12500000
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import ConfigError
from ..core.options import CommandOptions, option
from ..core.registry import BACKENDS, PRECISIONS

API_KEY_ENV = "VISIONTUNE_API_KEY"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # it becomes a URL path segment


@dataclass
class ServeSettings(CommandOptions):
    """Tunables of ``visiontune serve`` (the CLI flags of the same names)."""

    host: str = option("127.0.0.1", "interface to bind (127.0.0.1); others need --api-key", metavar="HOST")
    port: int = option(8000, "TCP port (8000)", metavar="PORT", check=(lambda v: 0 <= v <= 65535, "must be 0-65535"))
    max_batch: int = option(16, "images per forward pass (16)", check=(lambda v: v >= 1, "must be >= 1"))
    max_wait_ms: float = option(10.0, "longest wait for a batch to fill (10)", metavar="MS",
                                check=(lambda v: v >= 0, "must be >= 0"))
    max_queue: int = option(64, "images waiting at most; beyond it 503 + Retry-After (64)",
                            check=(lambda v: v >= 1, "must be >= 1"))
    timeout_s: float = option(10.0, "per-request timeout -> 504 (10)", metavar="S",
                              check=(lambda v: v > 0, "must be > 0"))
    max_body_mb: float = option(10.0, "request body limit -> 413 (10)", metavar="MB",
                                check=(lambda v: v > 0, "must be > 0"))
    # pixels an upload may have, read from its header before decoding: a 280 KB PNG of 9400x9400
    # costs seconds of CPU and gigabytes to decode (Pillow's own limit is ~179 MP)
    max_pixels: float = option(40.0, "largest upload in megapixels, read from the image header before decoding "
                                     "-> 413 (40)", metavar="MP", check=(lambda v: v > 0, "must be > 0"))
    api_key: str | None = option(None, f"require X-API-Key: KEY on /v1/* (visible to other users in `ps`: prefer "
                                       f"${API_KEY_ENV} or --api-key-file)", metavar="KEY")
    api_key_file: str | None = option(None, "read the API key from the first line of PATH", metavar="PATH")
    workers_threads: int | None = option(None, "image-decoding threads (default: CPU count)",
                                         check=(lambda v: v is None or v >= 1, "must be >= 1"))
    # inference/decoding threads run this much below the event loop (Linux)
    niceness: int = option(10, "run inference and decoding N steps below the HTTP event loop's CPU priority, so "
                               "503s and health checks stay fast when the CPU is saturated (10; 0: off; Linux)",
                           key="nice", check=(lambda v: 0 <= v <= 19, "must be 0-19"))
    precision: str = option("auto", "inference precision", choices=PRECISIONS)
    reject_below: float | None = option(None, "label 'unknown' when the (calibrated) top probability is below P",
                                        metavar="P", check=(lambda v: v is None or 0 <= v <= 1, "must be in [0, 1]"))
    threshold_tpr: float | None = option(None, "answer 'unknown' below the unknown-score that accepts this share of "
                                               "the model's known val images (default: the threshold set at "
                                               "training)", metavar="X",
                                         check=(lambda v: v is None or 0 < v <= 1, "must be in (0, 1]"))
    warmup: bool = option(True, "run one batch before accepting requests (the first answers are not slow)")
    # the model's name in the Open Inference Protocol's URLs (/v2/models/NAME/infer): fixed, so that
    # client code keeps working when the server is given a newly trained model
    model_name: str = option("visiontune", "the model's name in the Open Inference Protocol's /v2/models/NAME "
                                           "routes (visiontune)", metavar="NAME")
    # CPU runtime of a model folder (export.runtime.load_classifier): the fastest verified one by default
    backend: str = option("auto", "CPU runtime of a model folder (default: $VISIONTUNE_BACKEND, else auto)",
                          choices=BACKENDS,
                          default_factory=lambda: os.environ.get("VISIONTUNE_BACKEND", "auto"))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_pixel_count(self) -> int:
        return int(self.max_pixels * 1e6)

    @property
    def decode_threads(self) -> int:
        return self.workers_threads or max(1, os.cpu_count() or 1)

    def validate(self) -> ServeSettings:
        if not MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError(f"--model-name {self.model_name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                              "starting with a letter or digit")
        if self.api_key and self.api_key_file:
            raise ConfigError("give --api-key or --api-key-file, not both")
        return self

    def with_api_key(self) -> ServeSettings:
        """These settings with the key to require: ``api_key``, else ``api_key_file``'s first line,
        else ``$VISIONTUNE_API_KEY`` (None: no key); refuses a non-loopback host without one."""
        self.validate()
        key = self.api_key
        if key:
            print(f"visiontune: warning: --api-key is visible to every user of this machine in `ps`; prefer "
                  f"${API_KEY_ENV} or --api-key-file", file=sys.stderr)
        elif self.api_key_file:
            key = read_api_key(self.api_key_file)
        else:
            key = os.environ.get(API_KEY_ENV) or None
        if not is_loopback(self.host) and not key:
            raise ConfigError(f"binding {self.host} (not loopback) needs --api-key or ${API_KEY_ENV}")
        return replace(self, api_key=key, api_key_file=None)


def read_api_key(path: str) -> str:
    """The first line of ``path``, stripped; a clear error when it cannot be one."""
    try:
        key = Path(path).read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        why = {IndexError: "empty file", UnicodeDecodeError: "not UTF-8 text"}.get(type(exc)) or exc.strerror
        raise ConfigError(f"cannot read an API key from --api-key-file {path}: {why}; "
                          "write the key on its first line") from None
    if not key:
        raise ConfigError(f"--api-key-file {path} has an empty first line; write the key there")
    return key


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (the hosts that need no API key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
