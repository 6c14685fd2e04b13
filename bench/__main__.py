"""visiontune benchmark suite: `make bench` or `python -m bench [--data-root ../shared/data]`.

Every figure is a ratio measured side by side in one run on this machine, against the plain
PyTorch recipe in bench/seed_recipe.py (frozen backbone recomputed each epoch, model.train(),
Adam 1e-3, fp32 NCHW) and bench/plain_predict.py (eager fp32 loop). Results go to stdout and
bench/RESULTS.md (with machine info).

  (a) linear-probe, 10 epochs: wall time seed loop vs `visiontune train --strategy linear-probe`
  (b) full fine-tune training throughput (images/s): seed loop unfrozen vs visiontune finetune
  (c) predict throughput: plain eager fp32 loop vs `visiontune predict` (default --backend auto), on 960
      photos and on 1,000 CIFAR-10 images
  (d) input pipeline images/s vs model training images/s at 64, 128 and 224 px (images in memory;
      at 224 also photos read from disk)
  (e) scaling: time per epoch for 1k/5k/25k CIFAR-10 images (linear-probe cached, finetune)
  (f) fine-tune throughput at 64 px on CIFAR-10: plain PyTorch step of the same model, batch and
      memory format vs `visiontune train` (images in memory), side by side
  (g) `visiontune train --time 15m` on 40,000 CIFAR-10 images vs the seed recipe at 32 px for the
      same wall time, both scored on a fixed held-out 10,000 (bench/budget.py has 15/30/60 min)
  (h) OpenVINO vs ONNX Runtime, fp32 and int8: `visiontune compress --quantize int8` per backend on the
      (b) model: batch-32 throughput, batch-1 latency, accuracy, the int8 guard's evidence
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VT = [PY, "-m", "visiontune.cli"]


def sh(cmd: list[str], env: dict | None = None, stderr: bool = False) -> tuple[float, str]:
    """Run a command; return (wall seconds, stdout, or stderr with ``stderr``). Fails loudly with its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stderr if stderr else proc.stdout


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def unpack(data_root: Path, work: Path) -> dict[str, Path]:
    out = {}
    for name, archive, inner in (("hymenoptera", "hymenoptera-train.tar", "hymenoptera/train"),
                                 ("cifar10", "cifar10-train.tar.gz", "cifar10/train")):
        target = work / inner
        if not target.exists():
            with tarfile.open(data_root / archive) as tar:
                tar.extractall(work, filter="data")
        out[name] = target
    return out


def train_run(work: Path, name: str, data: Path | str, *args: str, cache: Path | None = None) -> tuple[float, Path]:
    run_dir = work / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    env = {"VISIONTUNE_CACHE": str(cache or work / f"cache-{name}")}
    seconds, _ = sh(VT + ["train", str(data), "--run-dir", str(run_dir), "--no-progress", *args], env)
    return seconds, run_dir


def seed_run(split_dir: Path, *args: str) -> tuple[float, dict]:
    seconds, out = sh([PY, str(ROOT / "bench" / "seed_recipe.py"), "--train-csv", str(split_dir / "train.csv"),
                       "--val-csv", str(split_dir / "val.csv"), *args])
    return seconds, last_json(out)


def bench_a(work: Path, data: dict) -> dict:
    """Linear probe, 10 epochs, 224 px, same split: wall time and accuracy."""
    vt_seconds, run = train_run(work, "a-linear-probe", data["hymenoptera"], "--strategy", "linear-probe",
                                "--epochs", "10")
    warm_seconds, _ = train_run(work, "a-linear-probe-warm", data["hymenoptera"], "--strategy", "linear-probe",
                                "--epochs", "10", cache=work / "cache-a-linear-probe")
    seed_seconds, seed = seed_run(run / "splits", "--epochs", "10", "--mode", "linear-probe")
    vt_acc = max(float(r["val_accuracy"]) for r in metrics(run))
    return {"name": "(a) linear-probe 10 epochs, wall s", "baseline": seed_seconds, "visiontune": vt_seconds,
            "ratio": seed_seconds / vt_seconds, "target": 5.0,
            "note": f"warm feature cache: {warm_seconds:.1f}s ({seed_seconds / warm_seconds:.1f}x); best val acc "
                    f"seed {seed['best_val_accuracy']:.4f} vs visiontune {vt_acc:.4f} (final: seed "
                    f"{seed['final_val_accuracy']:.4f})", "ok": seed_seconds / vt_seconds >= 5.0
            and vt_acc >= seed["best_val_accuracy"]}


def bench_b(work: Path, data: dict, epochs: int = 3) -> dict:
    """Full fine-tune training throughput at 224 px (training loop only, same data)."""
    _, run = train_run(work, "b-finetune", data["hymenoptera"], "--epochs", str(epochs), "--freeze-epochs", "0")
    rows = metrics(run)[1:]  # the first epoch includes worker start-up in both loops
    vt_ips = sum(float(r["train_images_per_second"]) for r in rows) / len(rows)
    _, fp32 = train_run(work, "b-finetune-fp32", data["hymenoptera"], "--epochs", str(epochs), "--freeze-epochs", "0",
                        "--precision", "32")
    fp32_rows = metrics(fp32)[1:]
    fp32_ips = sum(float(r["train_images_per_second"]) for r in fp32_rows) / len(fp32_rows)
    _, seed = seed_run(run / "splits", "--epochs", str(epochs), "--mode", "finetune")
    best = {name: max(float(r["val_accuracy"]) for r in metrics(d)) for name, d in (("auto", run), ("32", fp32))}
    return {"name": "(b) fine-tune training, images/s", "baseline": seed["train_images_per_second"],
            "visiontune": vt_ips, "ratio": vt_ips / seed["train_images_per_second"], "target": 1.3,
            "note": f"visiontune: channels_last + bf16 autocast (precision auto); seed: fp32 NCHW. Same split and "
                    f"seed: best val acc bf16 {best['auto']:.4f} vs fp32 {best['32']:.4f} ({fp32_ips:.1f} img/s "
                    f"fp32 channels_last); seed loop {seed['best_val_accuracy']:.4f}",
            "ok": vt_ips / seed["train_images_per_second"] >= 1.3 and best["auto"] >= best["32"] - 0.021}


def bench_c(work: Path, data: dict) -> list[dict]:
    """Prediction throughput over the same files: plain eager fp32 loop vs visiontune predict.

    visiontune runs its default ``--backend auto``: the fastest runtime verified on this CPU
    (eager PyTorch, ONNX Runtime or OpenVINO), measured once per model by a first call whose time is
    reported apart (one-time, cached in the user cache) and not counted in the ratio.
    """
    run = work / "runs" / "b-finetune"
    photos = sorted(str(p) for p in data["hymenoptera"].rglob("*.jp*g"))
    cifar = [str(p) for folder in sorted(data["cifar10"].iterdir()) for p in sorted(folder.glob("*.jpg"))[:100]]
    prepare_seconds, out = sh(VT + ["predict", str(run), photos[0], "--top-k", "1"], stderr=True)
    chosen = next((line for line in reversed(out.splitlines()) if line.startswith("runtime:")), "")  # the choice
    results = []
    for label, files in (("960 photos", (photos * 4)[:960]), ("1,000 CIFAR-10 images", cifar)):
        plain_seconds, out = sh([PY, str(ROOT / "bench" / "plain_predict.py"), "--model-dir", str(run / "model"),
                                 "--out", str(work / "plain.csv"), *files])
        last_json(out)  # the plain loop reports its own figures; the wall time above is what is compared
        vt_seconds, _ = sh(VT + ["predict", str(run), *files, "--out", str(work / "vt.csv"), "--top-k", "1"])
        agree = _agreement(work / "plain.csv", work / "vt.csv")
        results.append({
            "name": f"(c) predict, images/s ({label})", "baseline": len(files) / plain_seconds,
            "visiontune": len(files) / vt_seconds, "ratio": plain_seconds / vt_seconds, "target": 2.0,
            "note": f"whole-command wall time incl. start-up, 224 px model; top-1 agreement with the fp32 loop "
                    f"{agree:.4f}; {chosen or 'runtime: eager'} (first call: {prepare_seconds:.1f} s)",
            "ok": plain_seconds / vt_seconds >= 2.0})
    return results


def _agreement(a: Path, b: Path) -> float:
    def labels(p: Path) -> dict:
        with open(p, newline="") as fh:
            return {r["path"]: r["label"] for r in csv.DictReader(fh)}

    x, y = labels(a), labels(b)
    return sum(x[k] == y.get(k) for k in x) / len(x)


def bench_d(work: Path, data: dict) -> dict:
    """Input pipeline vs model throughput at 64, 128 and 224 px: the data must outrun the model."""
    _, out = sh([PY, str(ROOT / "bench" / "pipeline.py"), str(data["cifar10"]), str(data["hymenoptera"])])
    res = last_json(out)
    ratios = {size: res[size]["data"] / res[size]["model"] for size in ("64", "128", "224")}
    worst = min(ratios, key=ratios.get)
    sizes = "; ".join(f"{size} px: data {res[size]['data']:.0f} vs model {res[size]['model']:.0f} img/s "
                      f"({res[size]['precision']})" for size in ratios)
    return {"name": "(d) input pipeline / model images/s", "baseline": res[worst]["model"],
            "visiontune": res[worst]["data"], "ratio": ratios[worst], "target": 1.0,
            "note": f"images in memory, batched tensor augmentation: {sizes}; photos at 224 px: in memory "
                    f"{res['224']['data_photos']:.0f} img/s, from disk {res['224']['disk_photos']:.0f} img/s "
                    f"({res['workers']} workers)", "ok": ratios[worst] >= 1.0}


def bench_e(work: Path, data: dict, sizes=(1000, 5000, 25000)) -> dict:
    """Time per epoch vs dataset size on CIFAR-10 (64 px): must grow linearly."""
    root = data["cifar10"]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    per_class = {c: sorted((root / c).iterdir()) for c in classes}
    lines = []
    rates = []
    for n in sizes:
        csv_path = work / f"cifar-{n}.csv"
        with open(csv_path, "w") as fh:
            fh.write("path,label\n")
            for c in classes:
                for p in per_class[c][: n // len(classes)]:
                    fh.write(f"{p},{c}\n")
        lp_seconds, lp = train_run(work, f"e-lp-{n}", csv_path, "--strategy", "linear-probe", "--epochs", "3",
                                   "--img-size", "64", "--batch-size", "128")
        ft_seconds, ft = train_run(work, f"e-ft-{n}", csv_path, "--epochs", "1", "--freeze-epochs", "0",
                                   "--img-size", "64", "--batch-size", "64")
        lp_epoch = sum(float(r["epoch_seconds"]) for r in metrics(lp)) / 3
        ft_epoch = float(metrics(ft)[0]["epoch_seconds"])
        rates.append(ft_epoch / n)
        lines.append(f"{n}: finetune epoch {ft_epoch:.1f}s ({n / ft_epoch:.0f} img/s); linear-probe cached "
                     f"epoch {lp_epoch:.3f}s, whole run {lp_seconds:.1f}s (features once)")
    spread = max(rates) / min(rates)
    return {"name": "(e) scaling: finetune s/image 25k vs 1k", "baseline": rates[0] * 1000,
            "visiontune": rates[-1] * 1000, "ratio": rates[-1] / rates[0], "target": "~1 (linear)",
            "note": "; ".join(lines), "ok": spread < 1.5}


def _cifar_csv(work: Path, data: dict, n: int) -> Path:
    root = data["cifar10"]
    path = work / f"cifar-first-{n}.csv"
    with open(path, "w") as fh:
        fh.write("path,label\n")
        for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
            for p in sorted((root / c).iterdir())[: n // 10]:
                fh.write(f"{p},{c}\n")
    return path


def bench_f(work: Path, data: dict, size: int = 64, batches: int = 60) -> dict:
    """Fine-tune images/s at 64 px: the plain step of the same model vs the whole visiontune loop."""
    csv_path = _cifar_csv(work, data, 5000)
    _, out = sh([PY, str(ROOT / "bench" / "plain_train.py"), "--size", str(size), "--batch", "32", "--steps",
                 str(batches)])
    plain = last_json(out)
    _, run = train_run(work, "f-finetune-64", csv_path, "--img-size", str(size), "--resize-mode", "squash",
                       "--augment", "crop-flip", "--epochs", "2", "--freeze-epochs", "0", "--cache-images",
                       "--limit-train-batches", str(batches), "--limit-val-batches", "2", "--no-report")
    rows = metrics(run)[1:]  # the first epoch includes kernel selection
    vt = sum(float(r["train_images_per_second"]) for r in rows) / len(rows)
    ratio = vt / plain["images_per_second"]
    return {"name": f"(f) fine-tune {size} px images/s: plain step vs visiontune", "baseline":
            plain["images_per_second"], "visiontune": vt, "ratio": ratio, "target": 0.9,
            "note": f"batch 32, channels_last, precision {plain['precision']}; visiontune: images in memory, "
                    f"crop-flip on batched tensors, Lightning loop, {batches} batches per epoch",
            "ok": ratio >= 0.9}


def bench_g(work: Path, data: dict, minutes: int = 15) -> dict:
    """--time 15m on CIFAR-10 vs the seed recipe for the same wall time (held-out accuracy)."""
    from bench.budget import carve, plan_summary, test_accuracy, train

    train_csv, test_csv = carve(data["cifar10"], work)
    _, out = sh([PY, str(ROOT / "bench" / "seed_recipe.py"), "--train-csv", str(train_csv), "--val-csv",
                 str(test_csv), "--test-csv", str(test_csv), "--img-size", "32", "--checkpoints", str(minutes * 60)])
    seed = last_json(out)["checkpoints"][0]["test_accuracy"]
    seconds, run = train(work, f"g-time-{minutes}m", train_csv, "--time", f"{minutes}m")
    acc = test_accuracy(run, test_csv)
    return {"name": f"(g) --time {minutes}m CIFAR-10 held-out accuracy", "baseline": seed * 100,
            "visiontune": acc * 100, "ratio": acc / seed, "target": ">= 80% in <= 16 min",
            "note": f"visiontune {acc:.4f} in {seconds / 60:.1f} min ({plan_summary(run)}); seed recipe (frozen "
                    f"backbone, 32 px, Adam 1e-3) {seed:.4f} after the same {minutes} min",
            "ok": acc >= 0.80 and seconds <= (minutes + 1) * 60}


def bench_h(work: Path, data: dict) -> list[dict]:
    """OpenVINO vs ONNX Runtime, fp32 and int8, on the (b) fine-tuned model: `visiontune compress
    --quantize int8` once per backend, one after the other in this command (same validation images)."""
    run = work / "runs" / "b-finetune"
    reports = {}
    for backend in ("onnxruntime", "openvino"):
        out = work / f"h-compress-{backend}"
        sh(VT + ["compress", str(run), "--quantize", "int8", "--int8-backend", backend, "--out", str(out), "--force"])
        reports[backend] = json.loads((out / "compress_report.json").read_text())
    rows = {r["variant"]: r for report in reports.values() for r in report["variants"]}
    results = []
    for kind, ort, vino in (("fp32", "ONNX fp32", "OpenVINO fp32"), ("int8", "ONNX int8", "OpenVINO int8")):
        a, b = rows[ort], rows[vino]
        report = reports["openvino" if kind == "int8" else "onnxruntime"]
        notes = [n for r in reports.values() for n in r["notes"] if kind == "int8" and "int8" in n]
        results.append({
            "name": f"(h) {kind} img/s (b32): ONNX Runtime vs OpenVINO", "baseline": a["throughput_b32"],
            "visiontune": b["throughput_b32"], "ratio": b["throughput_b32"] / a["throughput_b32"], "target": "-",
            "note": f"batch-1 latency {a['latency_ms_b1']:.2f} ms vs {b['latency_ms_b1']:.2f} ms; val accuracy "
                    f"{a['val_accuracy']:.4f} vs {b['val_accuracy']:.4f} on {report['num_val']} images; "
                    f"size {a['size_mb']:.2f} vs {b['size_mb']:.2f} MB" + ("; " + "; ".join(notes) if notes else ""),
            "ok": not any(r["refused"] for r in reports.values()) if kind == "int8"
            else a["top1_agreement"] == b["top1_agreement"] == 1.0})
    return results


SECTIONS = {"a": bench_a, "b": bench_b, "c": bench_c, "d": bench_d, "e": bench_e, "f": bench_f, "g": bench_g,
            "h": bench_h}


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.node() or 'host'}: {cpu}, {os.cpu_count()} cores, CPU flags {cpu_flags()}, GPU {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def cpu_flags() -> str:
    """The SIMD features that decide CPU speed here (figures differ 2-3x between kinds)."""
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def earlier_rows(old: str, ran: set[str]) -> str:
    """Rows and notes of the cases this run skipped (``--only``), kept from the previous results,
    each under the machine it was measured on (rows an earlier run kept carry their own)."""
    skipped = tuple(k for k in SECTIONS if k not in ran)
    prefixes = tuple(f"| ({k})" for k in skipped) + tuple(f"- ({k})" for k in skipped)
    kept: dict[str, list[str]] = {}
    machine_line = "Machine: ?"
    for line in old.splitlines():
        if line.startswith("Machine: ") and machine_line == "Machine: ?":
            machine_line = line
        elif line.startswith("Not rerun by this command, from the previous results ("):
            machine_line = line[line.index("(") + 1:].rstrip("):")
        elif line.startswith(prefixes):
            kept.setdefault(machine_line, []).append(line)
    return "".join("\nNot rerun by this command, from the previous results (" + machine + "):\n\n"
                   "| benchmark | baseline | visiontune | ratio | target | pass |\n"
                   "| --- | ---: | ---: | ---: | ---: | :---: |\n"
                   + "\n".join(line for line in keep if line.startswith("|")) + "\n\n"
                   + "\n".join(line for line in keep if line.startswith("-")) + "\n"
                   for machine, keep in kept.items())


def render(results: list[dict], seconds: float) -> str:
    head = ("| benchmark | baseline | visiontune | ratio | target | pass |\n"
            "| --- | ---: | ---: | ---: | ---: | :---: |\n")
    body = "".join(
        f"| {r['name']} | {r['baseline']:.1f} | {r['visiontune']:.1f} | {r['ratio']:.2f} | {r['target']} | "
        f"{'yes' if r['ok'] else 'NO'} |\n" for r in results)
    notes = "".join(f"- {r['name']}: {r['note']}\n" for r in results)
    return head + body + "\n" + notes + f"\nTotal benchmark time: {seconds / 60:.1f} min\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench")
    ap.add_argument("--only", default="abcdefgh", help="sections to run, e.g. 'ac'")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = unpack(args.data_root, args.work)
    start = time.perf_counter()
    results = []
    for key in args.only:
        print(f"running ({key}) ...", flush=True)
        found = SECTIONS[key](args.work, data)
        found = found if isinstance(found, list) else [found]
        results.extend(found)
        print(render(found, time.perf_counter() - start), flush=True)
    table = render(results, time.perf_counter() - start)
    print(table)
    command = "make bench  # = python -m bench" + (f" --only {args.only}" if args.only != "abcdefgh" else "")
    ours = f"# Benchmark results\n\nMachine: {machine()}\n\nCommand: `{command}`\n\n{table}"
    # the sections other benchmarks write below ours (serving, compression, budget) are kept
    old = args.results.read_text() if args.results.exists() else ""
    ours += earlier_rows(old[:old.index("\n## ")] if "\n## " in old else old, set(args.only))
    rest = old[old.index("\n## "):] if "\n## " in old else ""
    args.results.write_text(ours + rest)


if __name__ == "__main__":
    main()
