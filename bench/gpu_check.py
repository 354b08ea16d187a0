"""The GPU check: training speed, accuracy and time to accuracy, inference speed and serving.

    bench/gpu_check.sh [STAGE ...] [options]        (or: python -m bench.gpu_check ...)

Stages, run in this order (default: all five, then the table):

  speed   training images/s at 224 px, batch 256, synthetic data: eager FP32 NCHW (the
          torchvision reference script's setting) against AMP, AMP + channels_last and
          AMP + channels_last + torch.compile.
  data    the fastest of those on the real JPEGs through dali-gpu and through the pytorch
          DataLoader (same workers), full epochs (--data-epochs, at least 2), each as a ratio to
          the synthetic rate of the same configuration, with the time each epoch waited for its
          data (in all, and for its first batch): what the data path costs.
  train   ``python -m train`` with the GPU profile on the data (what ``make train`` runs; give
          --epochs for a shorter schedule): final val top-1/top-5 and the wall time to reach
          90 %, 94 % and 95 % top-1.
  infer   exports the trained checkpoint (the .pt2 compiled for the GPU, and the FP32 ONNX),
          times eager FP32 / FP16, torch.compile and the .pt2 at batch 1, 32 and 256
          (``bench.gpu_inference``), and runs ``serve.validate`` for each engine that runs here,
          the checkpoint served compiled in FP16 (``--pt-precision fp16 --pt-compile``) included.
  serve   ``serve.infer`` end to end over the validation split with the .pt2 (or, where the
          infer stage could not make one, the checkpoint in eager FP32), and with the checkpoint
          compiled in FP16: DALI ``mixed`` (nvJPEG, GPU) decoding against the same loop with CPU
          decoding, how often the two pick the same class, and each end-to-end rate against the
          same model alone at the same batch (the infer stage's figure).
  table   print the table only.

Each measurement runs in its own process; its log goes to RESULTS/logs/ and its result is merged
into RESULTS/results.json as soon as it is known. So the stages can run in separate invocations
(one per time-limited job), a failing measurement costs only its own row, and the table printed
last (also written to RESULTS/table.md) covers everything measured so far. Without CUDA the same
commands run on the CPU with dali-cpu (a smoke test of the script: the figures mean nothing; the
compiled checkpoint runs in FP32 there, as serve refuses FP16 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.report import parse_checked

STAGES = ("speed", "data", "train", "infer", "serve")
# (label, train flags): the synthetic-data rows of the training-throughput table
SPEED_CONFIGS = [
    ("eager FP32, NCHW", ["--no-amp", "--no-compile", "--memory-format", "contiguous"]),
    ("AMP FP16, NCHW", ["--amp", "--no-compile", "--memory-format", "contiguous"]),
    ("AMP FP16 + channels_last", ["--amp", "--no-compile", "--memory-format", "channels_last"]),
    ("AMP FP16 + channels_last + torch.compile", ["--amp", "--compile", "--memory-format", "channels_last"]),
]
THRESHOLDS = (90.0, 94.0, 95.0)
# The checkpoint served compiled (infer: validate/pt-compiled; serve: serve/pt-compiled/*)
PT_COMPILED = "pt-compiled"


def pt_compiled_flags(cuda: bool) -> list[str]:
    """serve's flags for the checkpoint compiled: FP16 with CUDA graphs on a GPU, FP32 on the CPU
    (where serve refuses FP16), so the smoke run runs the same commands."""
    return ["--pt-precision", "fp16" if cuda else "fp32", "--pt-compile"]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results store


class Results:
    """results.json: one record per measurement key, rewritten atomically after each update."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "results.json"
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, rec: Any) -> None:
        from rn50.atomic import write_json

        self.data[key] = rec
        write_json(self.path, self.data)


def run(results: Results, name: str, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """``python ARGS`` with its output in logs/NAME.log; returns rc, wall seconds, command."""
    logf = results.root / "logs" / f"{name}.log"
    cmd = [sys.executable, *[str(a) for a in args]]
    shown = "python " + " ".join(shlex.quote(str(a)) for a in args)
    log(f"{name}: {shown}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    timed_out = False
    with open(logf, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc, timed_out = -9, True
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = logf.read_text(errors="replace").replace("\r", "\n").splitlines()[-12:]
        log(
            f"{name}: {f'stopped after {round(wall)} s (--train-timeout)' if timed_out else f'exit {rc}'}"
            f"; last lines of {logf}:\n    " + "\n    ".join(tail)
        )
    else:
        log(f"{name}: done in {wall:.0f} s")
    return {"rc": rc, "wall_s": wall, "command": shown, "log": str(logf), "timed_out": timed_out}


def history(run_dir: Path) -> list[dict[str, Any]]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def time_to(hist: list[dict[str, Any]], top1: float) -> float | None:
    """Wall seconds (the run's ``elapsed``) at the end of the first epoch whose val top-1 reaches
    ``top1``; None when no epoch does, NaN when that epoch's record has no ``elapsed``."""
    for r in hist:
        if r.get("val_top1", -1) >= top1:
            return float(r.get("elapsed", float("nan")))
    return None


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
    }
    try:
        import nvidia.dali as dali

        env["dali"] = dali.__version__
    except ImportError:
        env["dali"] = None
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    if cuda:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["gpu"] = None
    return env


# --------------------------------------------------------------------------- stages


def _speed_flags(a: argparse.Namespace, epochs: Any = "2") -> list[Any]:
    """Flags of every training-throughput run: two epochs unless told (the last one is timed), fp16 autocast."""
    return [
        "--epochs",
        epochs,
        "--batch-size",
        a.batch_size,
        "--image-size",
        a.image_size,
        "--amp-dtype",
        "fp16",
        "--workers",
        a.workers,
    ]


def stage_speed(a: argparse.Namespace, res: Results, cuda: bool) -> None:
    common = _speed_flags(a)
    for label, flags in SPEED_CONFIGS:
        key = "speed/synthetic/" + label
        out = res.root / "speed" / slug(label)
        r = run(
            res,
            "speed-" + slug(label),
            [
                "-m",
                "train",
                "--data-backend",
                "synthetic",
                # no --data: synthetic data with --num-classes (train refuses the two together)
                "--num-classes",
                "1000",
                "--synthetic-steps",
                a.steps,
                "--output",
                out,
                *common,
                *flags,
            ],
        )
        res.put(key, {**r, **_speed_figures(out, label, "synthetic")})
        _drop_checkpoints(out)


def stage_data(a: argparse.Namespace, res: Results, cuda: bool) -> None:
    """Full epochs on the real JPEGs through DALI and through the pytorch DataLoader, in the fastest
    AMP configuration of the speed stage, each as a ratio to that configuration's synthetic rate.
    At least two epochs: the first includes compilation and autotuning, and from the second on
    every epoch pays its data pipeline's start (a pipeline built ahead for DALI; new workers for
    the DataLoader), which short epochs would overstate and no synthetic row shows."""
    rows = [res["speed/synthetic/" + label] for label, _ in SPEED_CONFIGS[1:]]
    ok = [(r["img_per_s"], r["config"]) for r in rows if r and r.get("img_per_s")]
    if not ok:
        log("data: no AMP configuration has a synthetic figure yet (run the speed stage first)")
        return
    syn_ips, best = max(ok)
    flags = dict(SPEED_CONFIGS)[best]
    from rn50.layout import load_dataset

    n_train = len(load_dataset(a.data)[0].files)
    epochs = max(2, a.data_epochs)
    for backend in ("dali-gpu" if cuda else "dali-cpu", "pytorch"):
        key = f"speed/real/{backend}"
        out = res.root / "speed" / f"real-{backend}"
        for f in out.glob("metrics.jsonl"):  # no epoch of an earlier run may stand in for this one's
            f.unlink()
        cap = a.real_images_pytorch if backend == "pytorch" and a.real_images_pytorch is not None else a.real_images
        images = min(cap, n_train) if cap else n_train
        r = run(
            res,
            f"speed-real-{backend}",
            [
                "-m",
                "train",
                "--data",
                a.data,
                "--data-backend",
                backend,
                *(["--limit-train", images] if images < n_train else []),
                "--limit-val",
                a.batch_size,
                "--check-images",
                "off",  # a set-up pass, not part of any epoch; Fashion-MNIST has no bad file
                "--output",
                out,
                *_speed_flags(a, epochs),
                *flags,
            ],
            timeout=a.data_timeout,
        )
        h = history(out)
        per_epoch = images // a.batch_size * a.batch_size  # whole batches (drop_last)
        full = images == n_train
        words = f"full epochs of {per_epoch:,} images" if full else f"NOT full: {per_epoch:,} of {n_train:,} images"
        res.put(
            key,
            {
                **r,
                **_speed_figures(out, best, f"Fashion-MNIST JPEGs via {backend}, {words} an epoch"),
                # the first epoch includes compilation: alone it is no training rate
                "img_per_s": h[-1]["img_per_s"] if len(h) > 1 else None,
                "backend": backend,
                "epochs_planned": epochs,
                "images_per_epoch": per_epoch,
                "train_images": n_train,
                "full_epochs": full,
                "epoch_img_per_s": [x["img_per_s"] for x in h],
                "loader": [x.get("loader") for x in h],
                "synthetic_img_per_s": syn_ips,
                "vs_synthetic": h[-1]["img_per_s"] / syn_ips if len(h) > 1 else None,
            },
        )
        _drop_checkpoints(out)


def slug(label: str) -> str:
    return re.sub(r"-+", "-", "".join(c if c.isalnum() else "-" for c in label.lower())).strip("-")


def _speed_figures(out: Path, config: str, data: str) -> dict[str, Any]:
    h = history(out)
    return {
        "config": config,
        "data": data,
        "epochs": len(h),
        # the last epoch: the first one includes cuDNN autotuning and compilation
        "img_per_s": h[-1]["img_per_s"] if h else None,
        "first_epoch_img_per_s": h[0]["img_per_s"] if h else None,
    }


def _drop_checkpoints(out: Path) -> None:
    for f in [*out.glob("*.pt"), *out.glob("*.pt.manifest.json")]:
        f.unlink()


def stage_train(a: argparse.Namespace, res: Results, cuda: bool) -> None:
    out = res.root / "train"
    args = ["-m", "train", "--data", a.data, "--output", out, "--overwrite"]  # a rerun replaces its own run
    if a.epochs:
        args += ["--epochs", a.epochs]
    args += shlex.split(a.train_args or "")
    r = run(res, "train", args, timeout=a.train_timeout)
    h = history(out)
    cfg = {}
    man = out / "manifest.json"
    if man.is_file():
        cfg = json.loads(man.read_text()).get("train_config", {})
    rec: dict[str, Any] = {
        **r,
        "epochs_planned": cfg.get("epochs"),
        "epochs_done": len(h),
        "config": {
            k: cfg.get(k)
            for k in (
                "image_size",
                "batch_size",
                "preset",
                "lr",
                "warmup_epochs",
                "amp",
                "amp_dtype",
                "compile",
                "memory_format",
                "data_backend",
                "min_crop_scale",
                "mixup",
            )
        },
    }
    if h:
        best = max(h, key=lambda x: x["val_top1"])
        rec.update(
            final_top1=h[-1]["val_top1"],
            final_top5=h[-1]["val_top5"],
            best_top1=best["val_top1"],
            best_epoch=best["epoch"],
            elapsed_s=h[-1].get("elapsed"),
            img_per_s=sum(x["img_per_s"] for x in h[1:]) / max(1, len(h) - 1) if len(h) > 1 else h[0]["img_per_s"],
            time_to={f"{t:g}": time_to(h, t) for t in THRESHOLDS},
            curve=[(x["epoch"], round(x["val_top1"], 2), round(x.get("elapsed", 0), 1)) for x in h],
        )
    res.put("train", rec)


def stage_infer(a: argparse.Namespace, res: Results, cuda: bool) -> None:
    from rn50.manifest import manifest_path

    best = res.root / "train" / "best.pt"
    if not best.is_file():
        log(f"infer: {best} is missing: run the train stage first")
        res.put("infer/error", f"{best} missing: the train stage has not produced a checkpoint")
        return
    val = Path(a.data) / "val"
    pt2, onnx = res.root / "rn50.pt2", res.root / "rn50.fp32.onnx"
    for key, out, extra in (
        ("export/pt2", pt2, ["--precision", "fp32"]),
        ("export/onnx-fp32", onnx, ["--precision", "fp32"]),
    ):
        mf = manifest_path(out)
        for f in (out, mf):  # an earlier run's must not stand in for a failed (or skipped) export
            f.unlink(missing_ok=True)
        if a.no_export:
            log(f"infer: --no-export: no {out.name}")
            continue
        r = run(res, key.replace("/", "-"), ["-m", "export", "--checkpoint", best, "--output", out, *extra])
        par = json.loads(mf.read_text()).get("parity") if r["rc"] == 0 and mf.is_file() else None
        res.put(key, {**r, "parity": par})
    r = run(
        res,
        "gpu-inference",
        [
            "-m",
            "bench.gpu_inference",
            "--checkpoint",
            best,
            *(["--pt2", pt2] if pt2.is_file() else []),
            "--batches",
            a.batches,
            "--seconds",
            a.seconds,
            "--out",
            res.root / "inference.json",
        ],
    )
    inf = res.root / "inference.json"
    res.put("inference", {**r, **(json.loads(inf.read_text()) if r["rc"] == 0 and inf.is_file() else {})})
    cpu_limit = ["--limit", a.cpu_validate_images]
    for key, engine, extra in (
        ("validate/pt2", pt2, []),
        ("validate/onnx-fp32", onnx, cpu_limit),
        # the checkpoint as served compiled, against itself in eager FP32 (the reference)
        (f"validate/{PT_COMPILED}", best, pt_compiled_flags(cuda) + ([] if cuda else cpu_limit)),
    ):
        if not engine.is_file():
            continue
        rep = res.root / key.replace("/", "-")
        r = run(
            res,
            key.replace("/", "-"),
            [
                "-m",
                "serve.validate",
                "--engine",
                engine,
                "--checkpoint",
                best,
                val,
                "--batch-size",
                a.batch_size,
                "--report",
                rep,
                "--quiet",
                *extra,
            ],
        )
        j = Path(str(rep) + ".json")
        res.put(key, {**r, "report": json.loads(j.read_text()) if j.is_file() else None})


def stage_serve(a: argparse.Namespace, res: Results, cuda: bool) -> None:
    # The .pt2 where the infer stage could export one, else the checkpoint itself (eager FP32):
    # AOTInductor's CUDA loader can crash, and that must not cost this row too.
    best = res.root / "train" / "best.pt"
    engine = res.root / "rn50.pt2"
    if not engine.is_file():
        engine = best
        log(f"serve: no {res.root / 'rn50.pt2'}: serving the checkpoint {engine} (eager PyTorch FP32)")
    if not engine.is_file():
        log(f"serve: {engine} is missing: run the train stage first")
        return
    _serve_engine(a, res, cuda, "serve", engine, [])
    _serve_engine(a, res, cuda, f"serve/{PT_COMPILED}", best, pt_compiled_flags(cuda))


def _serve_engine(a: argparse.Namespace, res: Results, cuda: bool, key: str, engine: Path, flags: list[str]) -> None:
    """serve.infer of ``engine`` with both decodings: results ``KEY/gpu``, ``KEY/cpu``, ``KEY/agreement``."""
    val = Path(a.data) / "val"
    stem = key.replace("/", "-")
    for dev in ("gpu", "cpu") if cuda else ("cpu",):
        summ, pred = res.root / f"{stem}-{dev}.json", res.root / f"{stem}-{dev}.jsonl"
        for f in (summ, pred):  # no figure from an earlier run may stand in for this one
            f.unlink(missing_ok=True)
        # the engine runs where CUDA is (auto) both times; only where DALI decodes changes
        r = run(
            res,
            f"{stem}-{dev}",
            [
                "-m",
                "serve.infer",
                "--engine",
                engine,
                *flags,
                "--decode-on",
                "auto" if dev == "gpu" else "cpu",
                "--batch-size",
                a.batch_size,
                "--output",
                pred,
                "--summary",
                summ,
                "--quiet",
                val,
            ],
        )
        # exit 1: some images could not be decoded; the rest were classified and the summary counts them
        res.put(f"{key}/{dev}", {**r, **(json.loads(summ.read_text()) if r["rc"] in (0, 1) and summ.is_file() else {})})
    a_, b_ = res.root / f"{stem}-gpu.jsonl", res.root / f"{stem}-cpu.jsonl"
    if a_.is_file() and b_.is_file():
        res.put(f"{key}/agreement", top1_agreement(a_, b_))


# serve stage results: key -> what it serves (its rows are KEY/gpu, KEY/cpu, KEY/agreement)
SERVE_KEYS = {"serve": "the .pt2, else the checkpoint in eager FP32", f"serve/{PT_COMPILED}": "the checkpoint compiled"}


def model_only_engine(backend: str | None, provider: str) -> str | None:
    """The bench.gpu_inference row (engine name) that times the model a serve.infer run served."""
    if backend == "aoti":
        return "aotinductor fp32 (.pt2)"
    if backend != "pytorch":
        return None
    for what, name in (
        ("torch.compile fp16", "torch.compile fp16 (reduce-overhead)"),  # its CUDA name
        ("torch.compile fp32", "torch.compile fp32"),  # its CPU name (no compiled FP32 row on CUDA)
        ("eager fp16", "pytorch eager fp16"),
        ("eager fp32", "pytorch eager fp32"),
    ):
        if what in provider:
            return name
    return None


def model_only(res: Results, served: dict[str, Any]) -> tuple[str, float] | None:
    """``(engine, images/s)`` of the infer stage's timing of the model a serve.infer summary ran, at
    its batch size (input already on the device); None when that was not timed."""
    name = model_only_engine(served.get("backend"), served.get("provider") or "")
    for row in (res["inference"] or {}).get("rows") or []:
        if row.get("engine") == name and row.get("batch") == served.get("batch_size") and row.get("images_per_s"):
            return name, float(row["images_per_s"])
    return None


def top1_agreement(a: Path, b: Path) -> dict[str, Any]:
    """Share of images (by path) for which two serve.infer outputs name the same top-1 class."""

    def top1(p: Path) -> dict[str, int]:
        out = {}
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if "topk" in r:
                out[r["path"]] = r["topk"][0]
        return out

    x, y = top1(a), top1(b)
    common = x.keys() & y.keys()
    same = sum(x[k] == y[k] for k in common)
    return {"images": len(common), "same_top1": same, "percent": 100.0 * same / max(1, len(common))}


# --------------------------------------------------------------------------- table


def _f(v: Any, fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _mmss(s: float | None) -> str:
    if s is None:
        return "not reached"
    if s != s:  # NaN: a record without "elapsed"
        return "unknown"
    t = int(round(s))
    return f"{t // 60} min {t % 60:02d} s"


def _real_data_table(real: list[dict[str, Any]]) -> list[str]:
    """The data stage: real JPEGs against synthetic data in the same configuration, per epoch."""
    if not real:
        return []
    L = [
        "1b. Real data against synthetic data, same configuration (data stage; "
        f"{real[0].get('config')}; images/s per epoch, the first includes compilation)",
        "",
        "| backend | images an epoch | epochs | images/s per epoch | last epoch vs synthetic "
        "| waited for data, last epoch | of it for the first batch | pipeline built ahead (Pipeline.build) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in real:
        per = r.get("images_per_epoch") or 0
        images = f"{per:,} (full)" if r.get("full_epochs") else f"{per:,} of {r.get('train_images', 0):,} (NOT full)"
        done = len(r["epoch_img_per_s"])
        epochs = f"{done}/{r.get('epochs_planned')}" + (" (stopped by --data-timeout)" if r.get("timed_out") else "")
        ips = ", ".join(_f(x) for x in r["epoch_img_per_s"]) or ("failed (" + r["log"] + ")" if r["rc"] else "-")
        vs = r.get("vs_synthetic")
        ratio = f"{vs:.2f}x of {_f(r.get('synthetic_img_per_s'))}" if vs else "-"
        last = (r.get("loader") or [None])[-1] or {}
        wait = f"{last['wait_s']:.2f} s" if "wait_s" in last else "-"
        first = f"{last['first_s']:.2f} s" if "first_s" in last else "-"
        ahead = (
            f"{'yes' if last['built_ahead'] else 'no'} ({1000 * last['build_s']:.0f} ms)"
            if "built_ahead" in last
            else "- (not DALI)"
        )
        L.append(f"| {r.get('backend')} | {images} | {epochs} | {ips} | {ratio} | {wait} | {first} | {ahead} |")
    L += [
        "",
        "Waited: host seconds the training loop spent in the loader during the epoch (start, steps and "
        "teardown); the goal is a last epoch at >= 0.90x synthetic.",
        "",
    ]
    return L


def table(res: Results) -> str:
    env = res["env"] or {}
    L = [
        f"GPU check: {env.get('gpu') or 'no GPU (CPU smoke run)'}, driver {env.get('driver')}, "
        f"{env.get('cpu_cores')} CPU cores; torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
        f"DALI {env.get('dali')}, onnxruntime {env.get('onnxruntime')}, Python {env.get('python')}; {env.get('date')}",
        "",
    ]
    syn = [res["speed/synthetic/" + label] for label, _ in SPEED_CONFIGS]
    real = [res[k] for k in ("speed/real/dali-gpu", "speed/real/dali-cpu", "speed/real/pytorch")]
    if any(syn) or any(real):
        base = (syn[0] or {}).get("img_per_s")
        L += [
            "1. Training throughput (images/s; last of 2 epochs)",
            "",
            "| configuration | data | images/s | vs eager FP32 |",
            "| --- | --- | ---: | ---: |",
        ]
        for r in [x for x in syn + real if x]:
            ips = r.get("img_per_s")
            ratio = f"{ips / base:.2f}x" if ips and base else "-"
            L.append(
                f"| {r.get('config')} | {r.get('data')} | "
                f"{_f(ips) if r['rc'] == 0 else 'failed (' + r['log'] + ')'} | {ratio} |"
            )
        L.append("")
    L += _real_data_table([x for x in real if x and "epoch_img_per_s" in x])
    t = res["train"]
    if t:
        tt = t.get("time_to") or {}
        L += [
            "2. Accuracy and time to accuracy (`" + t["command"] + "`)",
            "",
            "| epochs | val top-1 | val top-5 | best top-1 (epoch) | to 90 % | to 94 % | to 95 % | last epoch at | "
            "process wall | train images/s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {t.get('epochs_done')}/{t.get('epochs_planned')} | {_f(t.get('final_top1'), '{:.2f}')} | "
            f"{_f(t.get('final_top5'), '{:.2f}')} | {_f(t.get('best_top1'), '{:.2f}')} ({t.get('best_epoch')}) | "
            + " | ".join(_mmss(tt.get(f"{x:g}")) for x in THRESHOLDS)
            + f" | {_mmss(t.get('elapsed_s'))} | {_mmss(t.get('wall_s'))} | {_f(t.get('img_per_s'))} |",
            "",
            "Times are wall time from the start of training (the run's `elapsed`: set-up, compilation and "
            "validation included); process wall adds Python start-up and exit.",
            "",
        ]
        if t.get("timed_out"):
            L += [f"(stopped by --train-timeout after {t.get('epochs_done')} epochs)", ""]
    inf = res["inference"]
    if inf and inf.get("rows"):
        batches = sorted({r["batch"] for r in inf["rows"]})
        engines = list(dict.fromkeys(r["engine"] for r in inf["rows"]))
        by = {(r["engine"], r["batch"]): r for r in inf["rows"]}
        base = {b: by.get(("pytorch eager fp32", b), {}).get("images_per_s") for b in batches}
        L += [
            "3. Inference from the trained checkpoint (images/s, p50 latency per batch; input already on the device)",
            "",
            "| engine | "
            + " | ".join(f"batch {b}" for b in batches)
            + " | vs eager FP32 at batch "
            + str(batches[-1])
            + " |",
            "| --- | " + " | ".join("---:" for _ in batches) + " | ---: |",
        ]
        for e in engines:
            cells = []
            for b in batches:
                r = by.get((e, b), {})
                cells.append(
                    "failed" if "error" in r else f"{_f(r.get('images_per_s'))} ({_f(r.get('p50_ms'), '{:.2f}')} ms)"
                )
            top = by.get((e, batches[-1]), {}).get("images_per_s")
            ratio = f"{top / base[batches[-1]]:.2f}x" if top and base[batches[-1]] else "-"
            L.append(f"| {e} | " + " | ".join(cells) + f" | {ratio} |")
        L.append("")
    vals = [(k, res[k]) for k in ("validate/pt2", "validate/onnx-fp32", f"validate/{PT_COMPILED}") if res[k]]
    if vals:
        L += [
            "serve.validate (engine vs eager FP32 PyTorch on the same DALI batches)",
            "",
            "| engine | runs on | images | engine top-1 | PyTorch top-1 | top-1 agreement "
            "| max abs logit diff | result |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for k, r in vals:
            rep = r.get("report") or {}
            if not rep:
                L.append(f"| {k.split('/')[1]} | - | - | - | - | - | - | failed ({r['log']}) |")
                continue
            L.append(
                f"| {k.split('/')[1]} | {rep.get('backend', '')} | {rep.get('images')} | "
                f"{_f(rep['engine_acc']['top1'], '{:.2f}')} | {_f(rep['pytorch']['top1'], '{:.2f}')} | "
                f"{_f(rep.get('top1_agreement'), '{:.2f}')} % | {_f(rep.get('max_abs_logit_diff'), '{:.3g}')} | "
                f"{'PASS' if rep.get('passed') else 'FAIL'} |"
            )
        L.append("")
    serve = [(key, d, res[f"{key}/{d}"]) for key in SERVE_KEYS for d in ("gpu", "cpu") if res[f"{key}/{d}"]]
    if serve:
        L += [
            "4. serve.infer end to end (files to predictions), against the same model alone at the same batch "
            "(table 3: input already on the device)",
            "",
            "| decoding | engine | images | images/s end to end | after the first batch | model only "
            "| vs model only (end to end / after the first batch) | engine latency p50 per batch | batch |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, d, r in serve:
            label = (
                "DALI mixed (nvJPEG + GPU resize)"
                if d == "gpu" and r.get("dali_device") == "gpu"
                else f"DALI on the CPU, engine on {r.get('engine_device', '?')}"
            )
            if r["rc"] not in (0, 1) or "images_per_s" not in r:
                L.append(f"| {label} | {SERVE_KEYS[key]} | - | failed ({r['log']}) | - | - | - | - | - |")
                continue
            lat = (r.get("latency_ms") or {}).get("p50")
            ips, after = r.get("images_per_s"), r.get("images_per_s_after_first_batch")
            mo = model_only(res, r)
            ratio = f"{ips / mo[1]:.2f}x / {_f(after / mo[1] if after else None, '{:.2f}x')}" if mo and ips else "-"
            L.append(
                f"| {label} | {Path(r.get('engine', '')).name} ({r.get('backend')}, {r.get('provider')}) | "
                f"{r.get('images', '-')} | {_f(ips)} | {_f(after)} | "
                f"{f'{mo[1]:,.0f} ({mo[0]})' if mo else '-'} | {ratio} | {_f(lat, '{:.1f}')} ms | "
                f"{r.get('batch_size', '-')} |"
            )
        for key in SERVE_KEYS:
            ag = res[f"{key}/agreement"]
            if ag:
                L += [
                    "",
                    f"Same top-1 class from both decodings ({SERVE_KEYS[key]}): {ag['same_top1']} of "
                    f"{ag['images']} images ({ag['percent']:.2f} %).",
                ]
        goal = res[f"serve/{PT_COMPILED}/gpu"]
        mo = model_only(res, goal) if goal and goal.get("images_per_s") else None
        if goal and mo and goal.get("dali_device") == "gpu":
            ratio = goal["images_per_s"] / mo[1]
            after = goal.get("images_per_s_after_first_batch")
            L += [
                "",
                f"Goal (issue 12): the checkpoint served compiled, DALI mixed, end to end >= 0.8x the model alone "
                f"at batch {goal.get('batch_size')}: {ratio:.2f}x "
                f"({_f(after / mo[1] if after else None, '{:.2f}x')} after the first batch): "
                + ("met." if ratio >= 0.8 else "not met."),
            ]
        L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("stages", nargs="*", metavar="STAGE", help=f"{', '.join(STAGES)} or table (default: all)")
    ap.add_argument(
        "--results", type=Path, default=Path("runs/gpu_check"), help="results folder (default: %(default)s)"
    )
    ap.add_argument("--data", default="data/fashion-mnist", help="ImageNet-layout data (default: %(default)s)")
    ap.add_argument("--epochs", type=int, help="train: epochs (default: the GPU profile's, 90)")
    ap.add_argument("--train-args", help="train: more flags for python -m train, quoted")
    ap.add_argument(
        "--train-timeout",
        type=float,
        help="train: stop the run after this many seconds (its "
        "last checkpoint stays; continue with python -m train --resume)",
    )
    ap.add_argument("--image-size", type=int, default=224, help="speed: image size (default 224)")
    ap.add_argument("--batch-size", type=int, default=256, help="speed/validate/serve: batch size (default 256)")
    ap.add_argument("--steps", type=int, default=50, help="speed: synthetic steps per epoch (default 50)")
    ap.add_argument(
        "--real-images",
        type=int,
        default=0,
        help="data: training images per epoch (default 0: all of them; a short epoch is dominated by "
        "the per-epoch start of the data pipeline: 30 batches gave half the rate of a full epoch)",
    )
    ap.add_argument(
        "--real-images-pytorch",
        type=int,
        help="data: training images per epoch for the pytorch DataLoader only, where a full epoch would "
        "not fit the time (default: as --real-images); the row says when its epochs are not full",
    )
    ap.add_argument(
        "--data-epochs", type=int, default=2, help="data: epochs per backend, at least 2 (default %(default)s)"
    )
    ap.add_argument(
        "--data-timeout",
        type=float,
        default=300.0,
        help="data: stop a backend's run after this many seconds; its completed epochs are "
        "reported (default %(default)s)",
    )
    ap.add_argument(
        "--workers", type=int, default=8, help="speed/data: data workers/threads, both backends (default 8)"
    )
    ap.add_argument("--batches", default="1,32,256", help="infer: batch sizes (default 1,32,256)")
    ap.add_argument("--seconds", type=float, default=3.0, help="infer: seconds per timing (default 3)")
    ap.add_argument(
        "--no-export",
        action="store_true",
        help="infer/serve: no .pt2 and ONNX export (their timing, validation and serving rows): the "
        "checkpoint's rows only, eager and compiled, for a short GPU session (the .pt2 export alone "
        "compiles for about 90 s)",
    )
    ap.add_argument(
        "--cpu-validate-images",
        type=int,
        default=1000,
        help="infer: images for serve.validate of the ONNX on ONNX Runtime's CPU provider (default 1000)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parse_checked(build_parser(), argv, may_be_zero=("--real-images", "--real-images-pytorch", "--workers"))
    bad = [s for s in a.stages if s not in (*STAGES, "table")]
    if bad:
        print(f"error: unknown stage(s) {', '.join(bad)} (choose from {', '.join(STAGES)}, table)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    res = Results(a.results)
    stages = [s for s in STAGES if s in a.stages] if a.stages else list(STAGES)
    if stages:
        res.put("env", environment(cuda))
        if not cuda:
            log("no CUDA GPU here: running on the CPU (dali-cpu) as a smoke test; the figures mean nothing")
    if any(s in stages for s in ("data", "train", "infer", "serve")) and not (Path(a.data) / "val").is_dir():
        print(
            f"error: {a.data}/val not found: make the data set first (make data, or python -m rn50.fashion_mnist "
            f"--out {a.data})",
            file=sys.stderr,
        )
        return 2
    fns = {"speed": stage_speed, "data": stage_data, "train": stage_train, "infer": stage_infer, "serve": stage_serve}
    for s in stages:
        log(f"stage {s}")
        fns[s](a, res, cuda)
    if not stages and not res["env"]:
        print(f"error: {res.root}: no results to tabulate (run a stage first, e.g. `speed`)", file=sys.stderr)
        return 2
    txt = table(res)
    from rn50.atomic import write_text

    write_text(res.root / "table.md", txt + "\n")
    print(txt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
