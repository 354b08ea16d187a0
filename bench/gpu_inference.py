"""Inference speed of the trained model on the GPU, in one process: ``python -m bench.gpu_inference``.

Times, at each batch size (default 1, 32 and 256), side by side on the same real validation
images (preprocessed once by the shared DALI path):

* PyTorch eager FP32 (channels_last; PyTorch's default TF32 convolutions on Ampere and newer),
* PyTorch eager FP16 (``model.half()``, channels_last),
* ``torch.compile`` of the FP16 model, ``mode="reduce-overhead"`` (Inductor kernels replayed as a
  CUDA graph: what a compiled PyTorch deployment would use; one compile per batch size),
* the AOTInductor package (``--pt2``, as written by ``python -m export --output X.pt2``; FP32).

Each timed iteration is synchronised, so the latency is that of one batch end to end on the
device, host-to-device input excluded (the input is already on the GPU, as DALI's ``mixed``
output is when serving); images/s = batch / mean latency. Writes JSON (``--out``) and prints a
Markdown table. Without CUDA it runs on the CPU (FP16 rows skipped), for a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import parse_checked
from rn50.errors import first_line

from .measure import time_calls


def timed(fn: Callable[[], Any], sync: Callable[[], None], seconds: float, warmup: int = 3) -> dict[str, float]:
    """Per-call latency (ms: mean, p50, p90) of ``fn`` after ``warmup`` calls, at least 5 calls."""
    from rn50.metrics import percentiles

    ms = [x * 1000 for x in time_calls(fn, seconds=seconds, min_calls=5, warmup=warmup, sync=sync)]
    pc = percentiles(ms, (50, 90))
    return {"mean_ms": sum(ms) / len(ms), "p50_ms": pc["p50"], "p90_ms": pc["p90"], "iters": len(ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("runs/default/best.pt"),
        help="trained checkpoint whose eager, compiled and exported forms are timed (default: %(default)s)",
    )
    ap.add_argument(
        "--pt2", type=Path, help="AOTInductor package exported from the same checkpoint (row skipped without it)"
    )
    ap.add_argument("--data", type=Path, help="data root (default: the checkpoint's)")
    ap.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes (default 1,32,256)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per measurement (default 3)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parse_checked(ap, argv)

    import torch

    from rn50.batches import iter_split
    from rn50.checkpoint import load_model
    from rn50.layout import balanced_subset, load_dataset
    from rn50.preprocess import Preprocessing

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    model, man = load_model(args.checkpoint)
    p = Preprocessing.from_dict(man["preprocessing"])
    data = args.data or Path((man.get("train_config") or {}).get("data", "data/fashion-mnist"))
    _, val = load_dataset(data)
    n = max(batches)
    files, labels = balanced_subset(val.files, val.labels, n, seed=0)
    x_np, _ = next(iter_split(files[:n], labels[:n], p, batch_size=n))
    x32 = torch.from_numpy(x_np).to(dev)
    while x32.shape[0] < n:  # fewer validation images than the largest batch: repeat them
        x32 = torch.cat([x32, x32])[:n]
    x32 = x32.contiguous(memory_format=torch.channels_last)
    x16 = x32.half()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    log = lambda m: print(f"bench: {m}", file=sys.stderr, flush=True)  # noqa: E731

    m32 = model.eval().to(dev).to(memory_format=torch.channels_last)
    engines: dict[str, tuple[Callable[[Any], Any], Any]] = {"pytorch eager fp32": (m32, x32)}
    if cuda:
        m16 = copy.deepcopy(m32).half()
        engines["pytorch eager fp16"] = (m16, x16)
        if not args.no_compile:
            engines["torch.compile fp16 (reduce-overhead)"] = (
                torch.compile(m16, mode="reduce-overhead", dynamic=False),
                x16,
            )
    elif not args.no_compile:
        engines["torch.compile fp32"] = (torch.compile(m32), x32)
    env = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_conv": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "image_size": p.image_size,
        "checkpoint": str(args.checkpoint),
        "pt2": str(args.pt2) if args.pt2 else None,
    }
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row: a crash later (an AOTInductor loader) keeps the rows so far
        if args.out:
            from rn50.atomic import write_json

            write_json(args.out, {"env": env, "rows": rows})

    def time_engine(name: str, fn: Callable[[Any], Any], x: Any) -> None:
        for b in batches:
            xb = x[:b]
            log(f"timing {name} at batch {b}")
            t_first = time.perf_counter()

            def call(fn=fn, xb=xb) -> Any:
                with torch.inference_mode():
                    return fn(xb)

            try:
                r = timed(call, sync, args.seconds)
            except Exception as e:  # one engine failing must not lose the others' figures
                msg = first_line(e)
                log(f"{name} at batch {b} failed: {msg}")
                rows.append({"engine": name, "batch": b, "error": msg[:300]})
                continue
            r.update(
                engine=name, batch=b, images_per_s=b / (r["mean_ms"] / 1000), first_call_s=time.perf_counter() - t_first
            )
            rows.append(r)
            save()

    for name, (fn, x) in engines.items():
        time_engine(name, fn, x)
    if args.pt2 is not None:  # loaded last, when every other row is saved
        from torch._inductor import aoti_load_package

        log(f"loading {args.pt2}")
        time_engine("aotinductor fp32 (.pt2)", aoti_load_package(str(args.pt2)), x32.contiguous())
    save()
    print(f"\nResNet50 v1.5 inference, {p.image_size} px, {env['device']}, torch {env['torch']}\n")
    print("| engine | batch | images/s | latency p50 ms | p90 ms |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['batch']} | failed: {r['error'][:80]} | | |")
        else:
            print(
                f"| {r['engine']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} |"
            )
    print(json.dumps(env), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
