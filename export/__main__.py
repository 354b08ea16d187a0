"""``python -m export``: a checkpoint in, one checked artifact (plus its manifest) out.

The output's suffix picks the artifact:

* ``.onnx``  ONNX for ONNX Runtime (fp32; fp16 inside with fp32 I/O; int8 = calibrated Q/DQ,
  U8S8 by default for ONNX Runtime on CPU);
* ``.plan``  TensorRT engine, built from an ONNX written beside it (``rn50.fp16.plan`` +
  ``rn50.fp16.onnx``; int8 = S8S8 Q/DQ as TensorRT wants);
* ``.pt2``   AOTInductor package (fp32; CPU, or CUDA when a GPU is present).

Every artifact is checked against the PyTorch checkpoint on real validation images before it is
renamed into place (``rn50.atomic``); one that fails is not written. Its manifest records its
sha256 and goes into place just before it (``rn50.manifest``), so an export killed between the
two renames leaves a pair that loading refuses, never a new artifact under an old manifest.
Exit status: 0 ok, 2 bad input or missing TensorRT/GPU (after writing the ONNX for a ``.plan``),
3 the artifact failed its parity bound or the INT8 accuracy gate (nothing written; ``--force``
writes it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rn50.atomic import unwritable_reason
from rn50.flags import AT_LEAST_1, Range, flag_problem

SUFFIXES = (".onnx", ".plan", ".pt2")
PRECISIONS = ("fp32", "fp16", "int8")


class UsageError(Exception):
    """Bad command line: exit 2."""


class GateError(Exception):
    """The artifact was built but failed a parity bound or the INT8 gate: exit 3, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise UsageError(message)


def log(msg: str) -> None:
    print(f"export: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from calibration.quantize import DEFAULT_METHOD, FLAVOURS, METHODS

    from .tensorrt_engine import HARDWARE_COMPAT

    ap = _Parser(
        prog="python -m export",
        description=(__doc__ or "").replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = ap.add_argument
    a("--checkpoint", required=True, type=Path, help="the trained checkpoint (best.pt)")
    a("--precision", required=True, choices=PRECISIONS, help="fp32, fp16 or int8")
    a("--output", required=True, type=Path, help="artifact path; suffix .onnx, .plan or .pt2 picks the kind")
    a("--data", type=Path, help="ImageNet-layout data root (default: the checkpoint's train_config data)")
    a("--batch-min", type=int, default=1, help="TensorRT profile min batch (default 1)")
    a("--batch-opt", type=int, default=32, help="TensorRT profile opt batch (default 32)")
    a("--batch-max", type=int, default=256, help="TensorRT profile / AOTInductor max batch (default 256)")
    a("--workspace", type=int, default=4096, help="TensorRT workspace limit in MiB (default 4096)")
    a("--timing-cache", type=Path, help="TensorRT timing cache file (loaded if present, saved after the build)")
    a("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    a(
        "--hardware-compat",
        default="none",
        choices=HARDWARE_COMPAT,
        help="TensorRT hardware compatibility: none (default), same-cc (TensorRT 10.9+, built on Turing+), "
        "ampere+ (built on Ampere+)",
    )
    a(
        "--calib-method",
        default=DEFAULT_METHOD,
        choices=METHODS,
        help=f"INT8 calibration: {', '.join(METHODS)} (default {DEFAULT_METHOD}; see docs/tensorrt.md)",
    )
    a("--calib-size", type=int, default=512, help="INT8 calibration images from the training split (default 512)")
    a(
        "--int8-flavour",
        default="auto",
        choices=("auto", *FLAVOURS),
        help="auto (s8s8 for .plan, u8s8 for .onnx), s8s8 (TensorRT's Q/DQ rules) or u8s8 (ONNX Runtime on x86; "
        "not for .plan: TensorRT needs zero points of 0)",
    )
    a(
        "--gate-images",
        type=int,
        default=2000,
        help="validation images (class-balanced) for the INT8-vs-FP32 accuracy gate (default 2000; all if fewer)",
    )
    a("--max-top1-drop", type=float, default=0.5, help="INT8 gate: most top-1 points INT8 may lose (default 0.5)")
    a("--calib-cache", type=Path, help="calibration cache folder (default: <output folder>/.calib-cache)")
    a("--force", action="store_true", help="write the artifact even if it fails its parity bound or the INT8 gate")
    a(
        "--parity-images",
        type=int,
        help="validation images (class-balanced) for the parity check "
        "(default 256; fp16: 64, as fp16 runs slowly on CPU)",
    )
    return ap


# Every numeric flag (rn50/flags.py): checked before the checkpoint is read.
FLAG_RANGES = {
    "--batch-min": AT_LEAST_1,
    "--batch-opt": AT_LEAST_1,
    "--batch-max": AT_LEAST_1,
    "--workspace": Range(lo=1, why="MiB"),
    "--opt-level": Range(lo=0, hi=5, why="TensorRT's builder optimisation levels"),
    "--calib-size": AT_LEAST_1,
    "--gate-images": AT_LEAST_1,
    "--max-top1-drop": Range(lo=0, hi=100, why="top-1 points"),
    "--parity-images": AT_LEAST_1,
}


def _check_args(args: argparse.Namespace) -> str:
    """The output's suffix (lower case), after the checks argparse's ``choices`` cannot make."""
    out: Path = args.output
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"--output {out}: unknown suffix {suffix or '(none)'!r}: use .onnx, .plan or .pt2")
    if suffix == ".plan" and args.precision == "int8" and args.int8_flavour == "u8s8":
        raise UsageError(
            "--int8-flavour u8s8 cannot go into a .plan: TensorRT accepts only zero points of 0 "
            "(s8s8, the default for .plan); use s8s8, or write an .onnx for ONNX Runtime"
        )
    if suffix == ".pt2" and args.precision != "fp32":
        raise UsageError(
            f"--precision {args.precision} is not available for .pt2 (AOTInductor packages are fp32 "
            f"here); use .onnx or .plan for {args.precision}"
        )
    why = flag_problem(args, FLAG_RANGES)
    if why:
        raise UsageError(why)
    if not args.batch_min <= args.batch_opt <= args.batch_max:
        raise UsageError(
            f"batch profile {args.batch_min}/{args.batch_opt}/{args.batch_max} must satisfy "
            f"1 <= --batch-min <= --batch-opt <= --batch-max"
        )
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder; give a file name such as {out}/rn50.{args.precision}{suffix}")
    why = unwritable_reason(out)  # before the checkpoint is read, not after the export
    if why:
        raise UsageError(f"--output {out}: {why}")
    return suffix


def _data_root(args: argparse.Namespace, manifest: dict[str, Any]) -> Path:
    from rn50.errors import DataError

    if args.data is not None:
        return Path(args.data)
    cfg = manifest.get("train_config") or {}
    if cfg.get("data"):
        data = Path(cfg["data"]).absolute()  # older checkpoints recorded the path as given
        if not data.is_dir():
            raise DataError(
                f"{data}: the training data folder recorded in {args.checkpoint}'s manifest is not there "
                f"(moved, or trained on another machine): pass --data ROOT (ImageNet layout with train/ and val/)"
            )
        log(f"data: {data} (the checkpoint's training data; --data to use another)")
        return data
    raise DataError(
        f"{args.checkpoint}: its manifest records no training data folder; pass --data ROOT "
        f"(ImageNet layout with train/ and val/; needed for the parity check and INT8 calibration)"
    )


@contextlib.contextmanager
def _scratch(near: Path) -> Iterator[Path]:
    """A hidden scratch folder beside ``near`` for intermediate files, removed whatever happens."""
    parent = near.parent if str(near.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{near.name}.", suffix=".work", dir=parent) as d:
        yield Path(d)


def _timed(what: str, fn: Callable[[], Any]) -> Any:
    log(f"{what} ...")
    t0 = time.perf_counter()
    r = fn()
    log(f"{what}: done in {time.perf_counter() - t0:.1f} s")
    return r


@dataclass
class _Job:
    """What every artifact kind needs: the arguments, the checkpoint and its data, the parity images."""

    args: argparse.Namespace
    model: Any
    p: Any  # rn50.preprocess.Preprocessing
    train: Any
    val: Any
    par_files: list[str]
    par_labels: list[int]
    common: dict[str, Any]
    extra: dict[str, Any]
    t_start: float


def _parity(job: _Job, run: Callable[[Any], Any], precision: str, what: str) -> Any:
    """``run`` (the written artifact's backend) against the checkpoint; GateError if it fails its
    bounds (unless --force)."""
    from .parity import compare

    n = len(job.par_files)
    c = _timed(
        f"parity of {what} against PyTorch on {n} validation images",
        lambda: compare(job.model, run, job.par_files, job.par_labels, job.p, precision),
    )
    log(
        f"parity: max |dlogit| {c.max_abs_logit_diff:.3g} (logit scale {c.max_abs_logit:.3g}), "
        f"top-1 agreement {c.top1_agreement:.2f}%, top-1 {c.candidate['top1']:.2f}% "
        f"(PyTorch {c.reference['top1']:.2f}%)"
    )
    if c.problem:
        if not job.args.force:
            raise GateError(
                f"{what} fails the {precision} parity bound: {c.problem}; nothing written (--force writes it anyway)"
            )
        log(f"warning: {c.problem} (written anyway: --force)")
    return c


def _accuracy(c: Any) -> dict[str, Any]:
    return {
        "top1": c.candidate["top1"],
        "top5": c.candidate["top5"],
        "images": c.images,
        "split": "val",
        "subset": "class-balanced",
        "pytorch_top1": c.reference["top1"],
        "pytorch_top5": c.reference["top5"],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from rn50.checkpoint import load_model, weights_sha256
    from rn50.compare import parity_bounds
    from rn50.layout import balanced_subset, load_dataset
    from rn50.manifest import preprocessing_of

    from . import onnx as onnx_export

    suffix = _check_args(args)
    t_start = time.perf_counter()
    log(f"loading {args.checkpoint}")
    model, ck_man = load_model(args.checkpoint)
    p = preprocessing_of(ck_man)
    classes = list(ck_man["classes"])
    data = _data_root(args, ck_man)
    train, val = load_dataset(data)
    if val.classes != classes:
        from rn50.errors import DataError

        raise DataError(f"{data}: its classes {val.classes} differ from the checkpoint's {classes}")
    n_par = args.parity_images or (64 if args.precision == "fp16" else 256)
    par_files, par_labels = balanced_subset(val.files, val.labels, n_par)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    b = parity_bounds(args.precision)
    job = _Job(
        args=args,
        model=model,
        p=p,
        train=train,
        val=val,
        par_files=par_files,
        par_labels=par_labels,
        common={"classes": classes, "preprocessing": p, "source": args.checkpoint},
        extra={
            # the model's identity beside the file's: serve.validate accepts another file of the same weights
            "source_weights_sha256": weights_sha256(model.state_dict()),
            "source_accuracy": ck_man.get("accuracy", {}),
            # the pretrained weights the checkpoint's run started from, if any (path, sha256, what was loaded)
            **({"init_from": ck_man["init_from"]} if ck_man.get("init_from") else {}),
            "data": str(data),
            "input_name": onnx_export.INPUT,
            "output_name": onnx_export.OUTPUT,
            "parity_bounds": {
                "max_rel_logit_diff": b.max_rel_logit_diff,
                "min_top1_agreement": b.min_top1_agreement,
                "max_top1_drop": b.max_top1_drop,
            },
        },
        t_start=t_start,
    )
    return {".onnx": _export_onnx, ".plan": _export_plan, ".pt2": _export_pt2}[suffix](job)


def _export_pt2(job: _Job) -> int:
    """AOTInductor package: compile, load it in a child process first, parity through AotiBackend."""
    import torch

    from rn50.atomic import atomic_path
    from rn50.backends import load_backend
    from rn50.manifest import new_manifest, write_manifest

    from .aoti import check_loads, compile_package

    args, out, p = job.args, job.args.output, job.p
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # atomic_path innermost, here and in _write_onnx: nothing (not even the scratch folder's
    # removal) runs between the manifest's rename and the artifact's
    with _scratch(out) as scratch, atomic_path(out) as tmp:
        pkg = scratch / "rn50.pt2"  # the packager insists on a name ending in .pt2
        _timed(
            f"torch.export + AOTInductor compile ({device}, batch 1..{args.batch_max})",
            lambda: compile_package(job.model, p.image_size, pkg, args.batch_max, device),
        )
        # AOTInductor's loader can crash its process instead of raising: a child loads it first
        _timed("loading it in a separate process", lambda: check_loads(pkg, device, p.image_size))
        backend = load_backend(
            pkg,
            {"max_batch": args.batch_max, "preprocessing": p.to_dict(), "precision": "fp32"},
            prefer_gpu=device == "cuda",
        )
        job.model = job.model.cpu()
        par = _parity(job, backend.run, "fp32", out.name)
        del backend
        os.replace(pkg, tmp)
        m = new_manifest(
            "aoti",
            precision="fp32",
            accuracy=_accuracy(par),
            parity=par.to_dict(),
            device=device,
            max_batch=args.batch_max,
            torch_export={"dynamic_batch": [1, args.batch_max]},
            artifact=tmp,
            **job.common,
            **job.extra,
        )
        write_manifest(out, m)  # before atomic_path renames the package into place
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - job.t_start:.0f} s")
    return 0


def _write_onnx(job: _Job, onnx_out: Path, kind: str) -> dict[str, Any]:
    """Export (fp32/fp16) or calibrate (int8) the ONNX at ``onnx_out``, checked through OrtBackend,
    and its manifest; returns the int8 facts a plan's manifest repeats ({} otherwise)."""
    from rn50.atomic import atomic_path
    from rn50.backends import load_backend
    from rn50.manifest import new_manifest, write_manifest

    from . import onnx as onnx_export

    precision, p = job.args.precision, job.p
    onnx_info: dict[str, Any] = {
        "opset": onnx_export.OPSET,
        "exporter": "torch.onnx (TorchScript, dynamo=False)",
        "dynamic_axes": {"input": "batch", "logits": "batch"},
    }
    int8_info: dict[str, Any] = {}
    with _scratch(onnx_out) as scratch, atomic_path(onnx_out) as tmp:
        if precision == "fp32":
            _timed(
                f"ONNX export (opset {onnx_export.OPSET})",
                lambda: onnx_export.export_fp32(job.model, p.image_size, tmp),
            )
        elif precision == "fp16":
            fp32 = scratch / "fp32.onnx"
            _timed(
                f"ONNX export (opset {onnx_export.OPSET})",
                lambda: onnx_export.export_fp32(job.model, p.image_size, fp32),
            )
            _timed("FP16 conversion (onnxconverter-common, fp32 I/O)", lambda: onnx_export.convert_fp16(fp32, tmp))
            onnx_info["converter"] = "onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)"
        else:
            int8_info = _int8(job, tmp, scratch, kind)
            onnx_info["quantization"] = int8_info["quantization"]
        onnx_export.stamp_metadata(tmp, job.common["classes"], p.to_dict(), precision)
        onnx_info["metadata_props"] = [
            f"{onnx_export.METADATA_PREFIX}{k}" for k in ("classes", "preprocessing", "precision")
        ]
        backend = load_backend(tmp, suffix=".onnx", prefer_gpu=True)
        par = _parity(job, backend.run, precision, onnx_out.name)
        m = new_manifest(
            "onnx",
            precision=precision,
            accuracy=_accuracy(par),
            parity=par.to_dict(),
            onnx=onnx_info,
            artifact=tmp,
            **int8_info.get("manifest", {}),
            **job.common,
            **job.extra,
        )
        write_manifest(onnx_out, m)  # before atomic_path renames the model into place
    log(f"wrote {onnx_out} ({onnx_out.stat().st_size / 2**20:.1f} MiB)")
    return int8_info


def _export_onnx(job: _Job) -> int:
    _write_onnx(job, job.args.output, "onnx")
    log(f"done in {time.perf_counter() - job.t_start:.0f} s")
    return 0


def _export_plan(job: _Job) -> int:
    """TensorRT plan: the ONNX beside it first (written even where TensorRT is missing), then the
    build, and parity through TrtBackend, the class that serves a plan."""
    from rn50.atomic import atomic_path
    from rn50.backends import load_backend
    from rn50.backends.tensorrt import unchecked_release
    from rn50.errors import EngineError
    from rn50.manifest import new_manifest, sha256_file, write_manifest

    from . import onnx as onnx_export
    from . import tensorrt_engine as te

    args, out, precision = job.args, job.args.output, job.args.precision
    onnx_out = out.with_suffix(".onnx")
    int8_info = _write_onnx(job, onnx_out, "tensorrt")
    why = te.missing()
    if why:
        raise EngineError(
            f"cannot build {out}: {why}. The ONNX it would be built from is written: {onnx_out} "
            f"(serve it with ONNX Runtime: python -m serve.infer --engine {onnx_out} IMAGES...)"
        )
    unchecked = unchecked_release(te.version())
    if unchecked:
        log(f"warning: {unchecked}")
    with atomic_path(out) as tmp:
        info = _timed(
            f"TensorRT {te.version()} build ({precision}, profile {args.batch_min}/{args.batch_opt}/{args.batch_max})",
            lambda: te.build_engine(
                onnx_out,
                tmp,
                precision=precision,
                input_name=onnx_export.INPUT,
                image_size=job.p.image_size,
                workspace_mib=args.workspace,
                batch=(args.batch_min, args.batch_opt, args.batch_max),
                opt_level=args.opt_level,
                hardware_compat=args.hardware_compat,
                timing_cache=args.timing_cache,
            ),
        )
        plan = load_backend(tmp, {"max_batch": args.batch_max}, suffix=".plan")
        par = _parity(job, plan.run, precision, out.name)
        del plan
        m = new_manifest(
            "tensorrt",
            precision=precision,
            accuracy=_accuracy(par),
            parity=par.to_dict(),
            max_batch=args.batch_max,
            onnx_source={"path": str(onnx_out), "sha256": sha256_file(onnx_out)},
            artifact=tmp,
            **info,
            **int8_info.get("manifest", {}),
            **job.common,
            **job.extra,
        )
        write_manifest(out, m)  # before atomic_path renames the plan into place
    log(f"wrote {out} in {time.perf_counter() - job.t_start:.0f} s")
    return 0


def _coarse_gate(n: int, asked: int, max_drop: float) -> str | None:
    """A warning when one image of the gate's sample is more than the allowed top-1 drop: the gate
    then judges single images, not the quantization (a small validation split shrinks the sample
    below --gate-images)."""
    if 100.0 / n <= max_drop:
        return None
    fewer = f"the {n} validation images there are (--gate-images {asked})" if n < asked else f"{n} images"
    return (
        f"the INT8 gate runs on {fewer}: one image is {100.0 / n:.2g} points of top-1, more than the "
        f"{max_drop:g} allowed, so a single image that INT8 classifies differently fails it"
    )


def _int8(job: _Job, dest: Path, scratch: Path, kind: str) -> dict[str, Any]:
    """FP32 ONNX -> calibrated Q/DQ ONNX at ``dest`` (a temp path), gated against FP32."""
    from calibration.dataset import calibration_set
    from calibration.gate import gate, gate_summary, lost_most_text
    from calibration.quantize import calibrate
    from rn50.layout import balanced_subset

    from . import onnx as onnx_export

    args, p = job.args, job.p
    flavour = args.int8_flavour if args.int8_flavour != "auto" else ("s8s8" if kind == "tensorrt" else "u8s8")
    cache_dir = args.calib_cache or (args.output.parent / ".calib-cache")
    fp32 = scratch / "fp32.onnx"
    _timed(
        f"FP32 ONNX export (opset {onnx_export.OPSET}) for calibration",
        lambda: onnx_export.export_fp32(job.model, p.image_size, fp32),
    )
    files = calibration_set(job.train.files, job.train.labels, args.calib_size)
    if len(files) < args.calib_size:
        log(f"warning: calibrating on all {len(files)} training images, fewer than --calib-size {args.calib_size}")
    log(
        f"calibration: {len(files)} class-balanced training images, method {args.calib_method}, "
        f"flavour {flavour}, cache {cache_dir}"
    )
    q = _timed(
        "INT8 calibration + Q/DQ quantization",
        lambda: calibrate(fp32, dest, files, p, method=args.calib_method, flavour=flavour, cache_dir=cache_dir),
    )
    if q["cache_hit"]:
        log(f"calibration: cache hit ({q['cache_key']}), not recalibrated")
    g_files, g_labels = balanced_subset(job.val.files, job.val.labels, args.gate_images)
    coarse = _coarse_gate(len(g_files), args.gate_images, args.max_top1_drop)
    if coarse:
        log(f"warning: {coarse}")
    g = _timed(
        f"INT8 gate: INT8 vs FP32 top-1 with ONNX Runtime on {len(g_files)} validation images",
        lambda: gate(fp32, dest, g_files, g_labels, p, max_drop=args.max_top1_drop, classes=job.val.classes),
    )
    log(gate_summary(g))
    if not g["passed"]:
        n = g["int8"]["images"]
        dropped = g["top1_drop"] > g["max_top1_drop"]
        if dropped:
            msg = (
                f"INT8 loses {g['top1_drop']:.2f} points of top-1 against FP32 (more than {g['max_top1_drop']}) "
                f"on {n} validation images; {lost_most_text(g)}"
            )
        else:
            msg = (
                f"INT8 fails the accuracy gate against FP32 on {n} validation images: {g['problem']}; "
                f"{lost_most_text(g)}"
            )
        if not args.force:
            hint = "--calib-method, a larger --calib-size"
            if coarse and dropped:  # one image decided it: a finer sample, or a looser bound
                more = "a larger validation split" if len(g_files) < args.gate_images else "a larger --gate-images"
                hint = f"{more}, --max-top1-drop, {hint}"
            raise GateError(f"{msg}; nothing written (try {hint}, or --force)")
        log(f"warning: {msg} (written anyway: --force)")
    return {"quantization": q, "manifest": {"int8": {**q, "gate": g}, "int8_flavour": flavour}}


def main(argv: Sequence[str] | None = None) -> int:
    from rn50.errors import PipelineError

    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (PipelineError, PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from rn50.interrupt import run_command

    sys.exit(run_command(main, "artifacts already complete are kept; the one in progress was not written"))
