"""Hardware choices made once: device, numeric precision, thread counts, process rank."""

from __future__ import annotations

import os
import sys
import time

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .errors import ConfigError
from .registry import PRECISIONS, Registry

# Measured on this project's 2-core AVX512-BF16 CPU (bench/): bf16 autocast speeds up
# EfficientNet-Lite0 training ~1.5x and inference ~1.9x at 224 px, but slows training below
# ~160 px, where fp32 channels_last is faster. On CPUs without native bf16 (AVX2 only) it is
# ~16x slower than fp32, so ``auto`` never picks it there.
MIN_BF16_CPU_SIZE = 160

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}
DENSE_OPS = (F.conv2d, F.linear)  # what bf16-dense computes in bfloat16 (a conv2d only without groups)


def is_rank_zero() -> bool:
    """True in single-process runs and in the rank-0 process of a distributed run.

    Lightning's own rank when it is loaded (it also knows the rank of ``ddp_spawn`` workers),
    else the variables the launchers set (torchrun, SLURM), so asking never imports Lightning.
    """
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        return getattr(rank_zero.rank_zero_only, "rank", 0) == 0
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_started() -> float:
    """When this process started (epoch seconds; import time where /proc is missing): the start
    of a time budget, so that the interpreter's own start-up counts against it."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after the comm
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; else total pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_info() -> tuple[str, list[str]] | None:
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm
    ``Features``); None where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith(("model name", "Model"))), "?")
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith(("flags", "Features"))), [])
    return name, flags


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, img_size: int, allowed: Registry = PRECISIONS) -> str:
    """``auto``: bf16 on GPUs that have it (else fp16); on CPU bf16 where supported and it pays.

    Example:
        >>> resolve_precision("32", 224)
        '32'
    """
    allowed.check(requested)  # inference's PRECISIONS; training passes TRAIN_PRECISIONS
    if requested == "16" and not torch.cuda.is_available():
        raise ConfigError("--precision 16 (fp16 mixed) needs a CUDA GPU; on CPU use --precision bf16 or 32")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    if cpu_supports_bf16() and img_size >= MIN_BF16_CPU_SIZE:
        return "bf16"
    return "32"


def autocast(precision: str, device_type: str | None = None):
    """Autocast context for inference at ``precision`` (a no-op for 32, and for bf16-dense, which
    infers in fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type or device(), dtype=dtype or torch.float32, enabled=dtype is not None)


def inference_precision(precision: str) -> str:
    """The precision :func:`autocast` infers in at the run's ``precision``: bf16-dense infers in fp32.

    Example:
        >>> inference_precision("bf16-dense"), inference_precision("bf16")
        ('32', 'bf16')
    """
    return precision if precision in AUTOCAST_DTYPES else "32"


def train_autocast(precision: str, device_type: str | None = None):
    """The context a training step runs in at ``precision``: :class:`DenseBF16` for bf16-dense,
    else :func:`autocast`."""
    return DenseBF16() if precision == "bf16-dense" else autocast(precision, device_type)


class DenseBF16(TorchFunctionMode):
    """Convolutions without groups and linear layers in bfloat16, everything else as it is.

    Each such layer's fp32 input, weight and bias are cast to bf16 and its output back to fp32,
    so weights, gradients and the optimizer stay fp32, as under autocast. Why not autocast: it
    also casts depthwise convolutions, whose oneDNN kernels are slower in bf16 than in fp32 on
    AVX512-BF16 CPUs, so EfficientNet-Lite0 at 96 px trained no faster under it than in fp32, and
    ~9% faster with only its dense layers in bf16 (bench/RESULTS.md, "The training step").
    Functions that dispatch on their own (multi-head attention's internal projections) run as
    they are: the mode sees their call, not the linear layers inside.

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 1)
        >>> with DenseBF16():
        ...     out = conv(torch.randn(1, 3, 2, 2))
        >>> out.dtype, conv.weight.dtype
        (torch.float32, torch.float32)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DENSE_OPS and args and args[0].dtype == torch.float32 and _groups(func, args, kwargs) == 1:
            def half(v):
                return v.bfloat16() if isinstance(v, torch.Tensor) else v
            return func(*map(half, args), **{k: half(v) for k, v in kwargs.items()}).float()
        return func(*args, **kwargs)


def _groups(func, args: tuple, kwargs: dict) -> int:
    if func is not F.conv2d:
        return 1
    return int(args[6] if len(args) > 6 else kwargs.get("groups", 1))
