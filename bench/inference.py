"""CPU inference throughput of the exported forms: ``python -m bench.inference [--checkpoint CKPT]``.

In one run, images/s at batch 1 and 32 for PyTorch eager, ONNX Runtime FP32, ONNX Runtime INT8
(U8S8 and S8S8 Q/DQ) and the AOTInductor package, with ratios against the natural baseline
(ORT FP32 and AOTInductor vs eager; INT8 vs ORT FP32), and the machine it ran on.

The artifacts are built in a temporary folder with the same code as ``python -m export`` (ONNX
export, ``calibration.quantize.calibrate`` on a small calibration set, AOTInductor compile) but
without the parity/gate passes, which the export tests cover. Inputs are real validation images
through the shared DALI preprocessing. Without a checkpoint (default ``runs/default/best.pt``) an
untrained ResNet50 at 32 px stands in: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .measure import machine, time_calls
from .report import add_output_flag, parse_checked, publish


def throughput(fn: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float) -> float:
    """Images/s of ``fn`` on the batch ``x`` (two warm-up calls, then at least 3 over ``seconds``)."""
    times = time_calls(lambda: fn(x), seconds=seconds, min_calls=3, warmup=2)
    return len(times) * len(x) / sum(times)


DEFAULT_CHECKPOINT = Path("runs/default/best.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"trained checkpoint to export and time (default: {DEFAULT_CHECKPOINT}, and when that does not "
        "exist an untrained 32 px, 10-class model)",
    )
    ap.add_argument("--data", type=Path, help="data root (default: the checkpoint's, else data/fashion-mnist)")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing per measurement (default 4)")
    ap.add_argument("--calib-size", type=int, default=128, help="calibration images per INT8 flavour (default 128)")
    add_output_flag(ap, "inference")
    args = parse_checked(ap, argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        # only the default may be missing: timing a stand-in for a checkpoint named on purpose would
        # report another model's figures
        print(f"error: {args.checkpoint}: checkpoint not found", file=sys.stderr)
        return 2
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT

    import torch

    from calibration.dataset import calibration_set
    from calibration.quantize import calibrate
    from export.aoti import compile_package
    from export.onnx import export_fp32
    from rn50.batches import iter_split
    from rn50.checkpoint import load_model
    from rn50.layout import balanced_subset, load_dataset
    from rn50.model import build_model
    from rn50.ort import session
    from rn50.preprocess import Preprocessing

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if checkpoint.is_file():
        model, man = load_model(checkpoint)
        p = Preprocessing.from_dict(man["preprocessing"])
        data = args.data or Path((man.get("train_config") or {}).get("data", "data/fashion-mnist"))
        what = str(checkpoint)
    else:
        p = Preprocessing.for_image_size(32)
        model = build_model(10).eval()
        data = args.data or Path("data/fashion-mnist")
        what = f"untrained ResNet50 v1.5, 10 classes ({checkpoint} not found)"
    train, val = load_dataset(data)
    vf, vl = balanced_subset(val.files, val.labels, 32, seed=0)
    x32, _ = next(iter_split(vf[:32], vl[:32], p, batch_size=32))
    inputs = {1: np.ascontiguousarray(x32[:1]), 32: x32}
    log = lambda m: print(f"bench: {m}", file=sys.stderr, flush=True)  # noqa: E731

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as d:
        d_ = Path(d)
        log("exporting FP32 ONNX")
        export_fp32(model, p.image_size, d_ / "fp32.onnx")
        files = calibration_set(train.files, train.labels, args.calib_size)
        for fl in ("u8s8", "s8s8"):
            log(f"calibrating INT8 {fl} on {len(files)} training images")
            calibrate(d_ / "fp32.onnx", d_ / f"int8_{fl}.onnx", files, p, flavour=fl, cache_dir=d_ / "cache")
        log("compiling the AOTInductor package (about a minute on 2 cores)")
        t0 = time.perf_counter()
        compile_package(model, p.image_size, d_ / "rn50.pt2", max_batch=64)
        t_aoti = time.perf_counter() - t0
        from rn50.backends import load_backend

        aoti = load_backend(d_ / "rn50.pt2", {"max_batch": 64, "preprocessing": p.to_dict()}, prefer_gpu=False).run

        def ort_fn(path: Path) -> Callable[[np.ndarray], Any]:
            s = session(path, prefer_gpu=False, threads=threads)
            return lambda x: s.run(None, {"input": x})

        def eager(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        engines: dict[str, Callable[[np.ndarray], Any]] = {
            "pytorch eager fp32": eager,
            "ort fp32": ort_fn(d_ / "fp32.onnx"),
            "ort int8 u8s8": ort_fn(d_ / "int8_u8s8.onnx"),
            "ort int8 s8s8": ort_fn(d_ / "int8_s8s8.onnx"),
            "aotinductor fp32": aoti,
        }
        base = {
            "pytorch eager fp32": None,
            "ort fp32": "pytorch eager fp32",
            "ort int8 u8s8": "ort fp32",
            "ort int8 s8s8": "ort fp32",
            "aotinductor fp32": "pytorch eager fp32",
        }
        res: dict[tuple[str, int], float] = {}
        for name, fn in engines.items():
            for b, x in inputs.items():
                log(f"timing {name} at batch {b}")
                res[name, b] = throughput(fn, x, args.seconds)

    lines = [
        f"\nResNet50 v1.5 inference on CPU, {p.image_size}x{p.image_size} input ({what})",
        f"machine: {machine()}; torch {torch.__version__}, {threads} threads; "
        f"onnxruntime {__import__('onnxruntime').__version__}",
        f"AOTInductor compile time: {t_aoti:.0f} s; whole run {time.perf_counter() - t_all:.0f} s\n",
    ]
    head = f"| {'engine':<20} | {'img/s b=1':>10} | {'img/s b=32':>10} | {'ratio b=1':>18} | {'ratio b=32':>18} |"
    lines += [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
    for name in engines:
        ref = base[name]
        r = [
            f"{res[name, b] / res[ref, b]:.2f}x vs {ref.split()[0] if ref.startswith('pytorch') else 'ort fp32'}"
            if ref
            else "baseline"
            for b in (1, 32)
        ]
        lines.append(f"| {name:<20} | {res[name, 1]:>10.1f} | {res[name, 32]:>10.1f} | {r[0]:>18} | {r[1]:>18} |")
    publish(
        args.output,
        "inference",
        "\n".join(lines),
        f"ResNet50 v1.5 inference on CPU, {p.image_size} px",
        {f"batch {b}": {name: res[name, b] for name in engines} for b in inputs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
