"""Registries: one per kind of thing (strategies, probe heads, optimizers, export formats...).

A registry is the single source of its names: CLI choices, config validation, help texts and
every "unknown X" error read it. Entries may name their implementation as ``"module:attr"``,
imported on first use, so building the CLI parser or validating a config never imports
Lightning, scikit-learn or onnxruntime.

Example:
    >>> OPTIMIZERS = Registry("optimizer", {"adamw": ("torch.optim:AdamW", "AdamW")})
    >>> OPTIMIZERS.names()
    ('adamw',)
    >>> OPTIMIZERS.get("adamw").__name__
    'AdamW'
    >>> OPTIMIZERS.check("adam")
    Traceback (most recent call last):
    ...
    visiontune.core.errors.ConfigError: optimizer='adam' is not valid; choose one of: adamw; did you mean 'adamw'?
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import ConfigError


def suggest(value: str, allowed: Iterable[str], fallback: bool = False) -> str:
    """``"; did you mean 'x'?"`` for the closest allowed value ('' when none is close)."""
    allowed = list(allowed)
    close = (difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
             or difflib.get_close_matches(value.replace("-", "_"), allowed, n=1, cutoff=0.6))
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid options are: {', '.join(allowed)}" if fallback else ""


class Registry:
    """Named entries of one kind: ``name -> (implementation or "module:attr", help)``."""

    def __init__(self, kind: str, entries: dict[str, tuple[Any, str]] | None = None):
        self.kind = kind
        self._entries: dict[str, tuple[Any, str]] = dict(entries or {})

    @classmethod
    def choices(cls, kind: str, help_by_name: dict[str, str] | None = None, **more: str) -> Registry:
        """A registry of plain names (each name is its own value), with a help text each."""
        return cls(kind, {name: (name, text) for name, text in {**(help_by_name or {}), **more}.items()})

    def register(self, name: str, target: Any = None, help: str = ""):
        """Add ``name``; usable as a decorator when ``target`` is omitted."""
        if target is None:
            def decorator(obj):
                self._entries[name] = (obj, help)
                return obj
            return decorator
        self._entries[name] = (target, help)
        return target

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self, name: str) -> str:
        return self._entries[name][1]

    def describe(self) -> str:
        """``a (help) | b (help)`` for CLI help texts."""
        return " | ".join(f"{n}: {h}" if h else n for n, (_, h) in self._entries.items())

    def check(self, name: Any) -> str:
        """``name`` when registered, else :class:`ConfigError` listing the choices."""
        text = str(name)
        if text not in self._entries:
            raise ConfigError(f"{self.kind}={text!r} is not valid; choose one of: {', '.join(self._entries)}"
                              + suggest(text, self._entries))
        return text

    def get(self, name: Any) -> Any:
        """The implementation of ``name`` (imported on first use when given as ``"module:attr"``)."""
        target, help_text = self._entries[self.check(name)]
        if isinstance(target, str) and ":" in target:
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[str(name)] = (target, help_text)
        return target

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_PRECISIONS = (("auto", "bf16 where the hardware makes it pay, else fp32"), ("32", "fp32"),
               ("bf16", "bfloat16 autocast"), ("16", "fp16 autocast (CUDA only)"))
PRECISIONS = Registry("precision", {name: (name, text) for name, text in _PRECISIONS})  # of inference
# training's: the same and bf16-dense, a training step's precision (what it computes is inferred in fp32)
TRAIN_PRECISIONS = Registry("precision", {name: (name, text) for name, text in (
    ("auto", "with a time budget the fastest the plan measures (fp32, bf16 or bf16-dense), else bf16 where the "
             "hardware makes it pay, else fp32"), *_PRECISIONS[1:], (
    "bf16-dense", "training steps with convolutions without groups and linear layers in bfloat16, the rest "
                  "(depthwise convolutions, norms) and all evaluation in fp32"))})
# where a model folder runs on the CPU (inference.accelerated picks and verifies it)
BACKENDS = Registry("backend", {name: (name, text) for name, text in (
    ("auto", "the fastest of eager PyTorch, ONNX Runtime and OpenVINO measured on this CPU once per model, each "
             "graph verified against eager fp32 (cached in the user cache)"),
    ("eager", "PyTorch"), ("onnxruntime", "ONNX Runtime, when verified"), ("openvino", "OpenVINO, when verified"))})
