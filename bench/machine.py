"""What this machine can do and what training uses of it: GFLOP/s achieved beside the measured peak.

    python -m bench.machine [--compile] [--step] [--candidates lowres_cnn@32,efficientnet_lite0@96] [--results ...]

Peak: a 2048x2048 matmul and a 3x3 convolution (256 channels, 16x16, channels_last) in fp32 and
bf16. Achieved: each candidate the time-budget planner weighs for 32-px images (the compact
networks at 32 px, EfficientNet-Lite0 fine-tuned at 64-128 px), its training FLOPs per image
counted by ``torch.utils.flop_counter`` (3x the forward pass) times the images/s the planner's own
measurement gives (:func:`visiontune.training.budget.measure_throughput`, batch 64) in each
precision. ``--compile`` adds ``torch.compile``'s speed and its compile time. ``--step`` adds, for
EfficientNet-Lite0 fine-tuned as the plans do (batch 32, BatchNorm frozen, fused AdamW), the
training step's precisions timed side by side (:func:`visiontune.training.budget.side_by_side`) and
where the fp32 step's time goes, by kind of operation (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.__main__ import machine
from bench.budget import write_results
from visiontune.core.hardware import cpu_supports_bf16
from visiontune.models.factory import build_model
from visiontune.training.budget import PRECISION_NAMES, _TrainStep, measure_throughput, side_by_side
from visiontune.training.optim import OptimizerSettings, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [("lowres_cnn", 32), ("lowres_cnn_wide", 32), ("efficientnet_lite0", 64), ("efficientnet_lite0", 96),
              ("efficientnet_lite0", 128)]


def rate(fn, flops: float, seconds: float = 2.0) -> float:
    """GFLOP/s of ``fn`` (doing ``flops`` per call), after a warm-up call."""
    fn()
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return flops * calls / (time.perf_counter() - start) / 1e9


def peaks(precisions: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        x = torch.randn(64, 256, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)
        with torch.no_grad():
            out[prec] = {"matmul": rate(lambda a=a, b=b: a @ b, 2 * 2048 ** 3),
                         "conv3x3": rate(lambda conv=conv, x=x: conv(x), 2 * 64 * 256 * 256 * 9 * 16 * 16)}
    return out


def train_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one training step on one image: 3x the counted forward pass (the usual estimate;
    torch's counter overcounts the backward of depthwise convolutions ~13x on EfficientNet-Lite0)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return 3 * counter.get_total_flops()


def compiled_rate(model: torch.nn.Module, size: int, precision: str) -> tuple[float, float, float]:
    """(eager training images/s, ``torch.compile`` training images/s, seconds to compile): the same
    training step (batch 64, channels_last, AdamW) timed both ways."""
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)

    def stepper(net):
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = net(x).float().logsumexp(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    model.train()
    eager = rate(stepper(model), 64.0, 3.0) * 1e9
    compiled = stepper(torch.compile(model))
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    return eager, rate(compiled, 64.0, 3.0) * 1e9, compile_s


def fine_tune_step(size: int, precision: str, batch: int = 32):
    """A step of EfficientNet-Lite0 fine-tuned as the plans do (BatchNorm frozen, fused AdamW)."""
    model, _, _ = build_model("efficientnet_lite0", 10, "default")
    model = model.to(memory_format=torch.channels_last)
    step = _TrainStep(model, make_optimizer(model.parameters(), OptimizerSettings(lr=0.0)), precision, batch, size,
                      frozen_norms=True)
    step()
    return step


def time_shares(step, steps: int = 5) -> dict[str, float]:
    """Share of ``step``'s CPU time in convolutions (depthwise, dense; forward and backward), BatchNorm,
    copies and padding, and everything else, by ``torch.profiler``'s self time of each operation."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    shares: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in ("aten::convolution_backward", "aten::mkldnn_convolution"):
            weight = event.input_shapes[2 if "backward" in key else 1]
            kind = "depthwise" if len(weight) == 4 and weight[1] == 1 else "dense"
            key = f"convolution, {kind}, {'backward' if 'backward' in key else 'forward'}"
        elif "batch_norm" in key:
            key = "BatchNorm, forward and backward"
        elif key in ("aten::copy_", "aten::fill_", "aten::constant_pad_nd"):
            key = "copies, fills and padding"
        else:
            key = "everything else (activations, optimizer, loss)"
        shares[key] = shares.get(key, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def step_lines(sizes: list[int]) -> list[str]:
    """The ``--step`` tables: precisions side by side, then where the fp32 step's time goes."""
    precisions = ["32", "bf16", "bf16-dense"] if cpu_supports_bf16() else ["32"]
    lines = ["", "EfficientNet-Lite0's fine-tuning step (batch 32, BatchNorm frozen, fused AdamW), the precisions' "
             "steps alternated for 10 s each (`side_by_side`):", "",
             "| size | " + " | ".join(f"{PRECISION_NAMES[p]} img/s" for p in precisions) + " | fastest against fp32 |",
             "| ---: |" + " ---: |" * (len(precisions) + 1)]
    for size in sizes:
        rates = side_by_side({p: fine_tune_step(size, p) for p in precisions}, 32, 10.0)
        best = max(rates, key=rates.__getitem__)
        lines.append(f"| {size} | " + " | ".join(f"{rates[p]:.0f}" for p in precisions)
                     + f" | {PRECISION_NAMES[best]} {rates[best] / rates['32']:.2f}x |")
        print(lines[-1], flush=True)
    shares = {size: time_shares(fine_tune_step(size, "32")) for size in sizes}
    kinds = list(shares[sizes[0]])
    lines += ["", "Where the fp32 step's time goes (`torch.profiler`, self CPU time of 5 steps):", "",
              "| | " + " | ".join(f"{s} px" for s in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    lines += [f"| {k} | " + " | ".join(f"{100 * shares[s].get(k, 0.0):.0f}%" for s in sizes) + " |" for k in kinds]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    ap.add_argument("--step", action="store_true", help="also time EfficientNet-Lite0's fine-tuning step's precisions "
                                                        "side by side and profile it (about a minute per size)")
    ap.add_argument("--candidates", default=",".join(f"{n}@{s}" for n, s in CANDIDATES),
                    help="NETWORK@SIZE, comma-separated (default: every candidate the planner weighs for 32-px images)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    candidates = [(c.split("@")[0], int(c.split("@")[1])) for c in args.candidates.split(",") if c]
    torch.manual_seed(0)
    precisions = ["32", "bf16"] if cpu_supports_bf16() else ["32"]
    peak = peaks(precisions)
    lines = [f"Machine: {machine()}", "", "Command: `python -m bench.machine" + (" --compile" if args.compile else "")
             + (" --step" if args.step else "")
             + (f" --candidates {args.candidates}" if candidates != CANDIDATES else "") + "`", "",
             "| | " + " | ".join(f"{'fp32' if p == '32' else p} GFLOP/s" for p in precisions) + " |",
             "| --- |" + " ---: |" * len(precisions)]
    for op in ("matmul", "conv3x3"):
        lines.append(f"| peak: {op} | " + " | ".join(f"{peak[p][op]:.0f}" for p in precisions) + " |")
    for name, size in candidates:
        model, _, _ = build_model(name, 10, "none")
        flops = train_flops(model, size)
        cells, speeds = [], {}
        for prec in precisions:
            (t,) = measure_throughput(model, [size], prec, 64, seconds=3.0)
            speeds[prec] = t.train
            cells.append(f"{t.train:.0f} img/s = {t.train * flops / 1e9:.0f} "
                         f"({100 * t.train * flops / 1e9 / peak[prec]['conv3x3']:.0f}% of conv peak)")
        lines.append(f"| train {name} at {size} px ({flops / 1e9:.2f} GFLOP/image) | " + " | ".join(cells) + " |")
        if args.compile:
            fast = max(precisions, key=speeds.__getitem__)  # the faster in the row above
            eager, speed, compile_s = compiled_rate(model, size, fast)
            lines.append(f"| the same, {PRECISION_NAMES.get(fast, fast)}, one training step timed eager and under "
                         f"torch.compile | {eager:.0f} img/s eager, {speed:.0f} compiled ({speed / eager:.2f}x) after "
                         f"{compile_s:.0f} s compiling |" + " |" * (len(precisions) - 1))
        print(lines[-1], flush=True)
    if args.step:
        lines += step_lines(sorted({size for name, size in candidates if name == "efficientnet_lite0"}) or [96])
    text = "\n".join(["## Machine: peak and achieved GFLOP/s", "", *lines, ""])
    print(text)
    write_results(args.results, "## Machine: peak and achieved GFLOP/s", text)


if __name__ == "__main__":
    main()
