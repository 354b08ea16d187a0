"""What the serve commands (``serve.infer``, ``serve.validate``, ``serve.triton``) share around
their work: the flags they have in common, the device choice, DALI's thread count and the check of
output paths before any work."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

from rn50.errors import DataError
from rn50.flags import Range, flag_problem


def pick_device(requested: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is usable, else ``cpu``; ``gpu`` without CUDA is an error."""
    import torch

    have = torch.cuda.is_available()
    if requested == "auto":
        return "gpu" if have else "cpu"
    if requested == "gpu" and not have:
        raise DataError("--device gpu: no CUDA GPU is available here (use --device auto or cpu)")
    return requested


THREADS_ENV = "RN50_DALI_THREADS"


def _threads_env() -> tuple[int | None, str | None]:
    """``RN50_DALI_THREADS`` read once: (DALI's CPU threads or None for DALI's default, why unusable)."""
    v = os.environ.get(THREADS_ENV)
    if not v:
        return None, None
    try:
        if int(v) >= 1:
            return int(v), None
    except ValueError:
        pass
    return (
        None,
        f"{THREADS_ENV}={v!r}: must be a whole number of DALI CPU threads, at least 1 (or unset: DALI's default)",
    )


def usage_problem(args: argparse.Namespace, ranges: Mapping[str, Range]) -> str | None:
    """Why a serve command cannot start, from its flags (``ranges``, :func:`rn50.flags.flag_problem`)
    or ``RN50_DALI_THREADS``, checked before any work; else None."""
    return flag_problem(args, ranges) or _threads_env()[1]


def env_threads() -> int | None:
    """DALI's CPU threads from ``RN50_DALI_THREADS`` (checked by :func:`usage_problem`), else None."""
    return _threads_env()[0]


def check_outputs(outputs: Mapping[str, str | None], keep: Iterable[tuple[str, str | None]] = ()) -> str | None:
    """The first ``--flag PATH: reason`` among the ``outputs`` (flag -> path) that cannot be
    written, or that would replace a file the command reads or another output: ``keep`` holds
    (what, path) pairs such as ("the engine", ENGINE). Paths are compared where they lead (links
    followed), so another name for the same file is caught too. Else None."""
    from rn50.atomic import unwritable_reason

    taken = {os.path.realpath(path): what for what, path in keep if path}
    for flag, path in outputs.items():
        if not path:
            continue
        why = unwritable_reason(path)
        if why:
            return f"--{flag.replace('_', '-')} {path}: {why}"
        same = taken.get(os.path.realpath(path))
        if same:
            return (
                f"--{flag.replace('_', '-')} {path}: is {same}, which this command reads or writes; give another file"
            )
        taken[os.path.realpath(path)] = f"the --{flag.replace('_', '-')} file"
    return None


# The flags the serve commands share keep one type, choice list and default everywhere (the code
# behind them reads them alike); each command words the help for what the flag does there.


def new_parser(command: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``python -m COMMAND``; the description and epilog keep their own line breaks."""
    return argparse.ArgumentParser(
        prog=f"python -m {command}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog=epilog,
    )


def add_engine(ap: argparse.ArgumentParser, help: str) -> None:
    ap.add_argument("--engine", required=True, help=help)


def add_batch_size(ap: argparse.ArgumentParser, default: int, help: str) -> None:
    ap.add_argument("--batch-size", type=int, default=default, help=help)


def add_topk(ap: argparse.ArgumentParser, help: str) -> None:
    ap.add_argument("--topk", type=int, default=5, help=help)


def add_device(ap: argparse.ArgumentParser, help: str) -> None:
    """``--device auto|cpu|gpu``, read by :func:`pick_device`."""
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help=help)


def add_max_pixels(ap: argparse.ArgumentParser, help: str) -> None:
    """``--max-pixels N``; None stands for ``rn50.layout.MAX_PIXELS``."""
    ap.add_argument("--max-pixels", type=int, default=None, help=help)


# How a .pt engine runs. Named --pt-*: for every other engine the precision and the compilation
# are properties of the exported file (python -m export --precision), which a bare --precision or
# --compile here would seem to change.
PT_PRECISIONS = ("fp32", "fp16")


def add_pt_options(ap: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """``--pt-precision`` and ``--pt-compile``, read by :func:`pt_options`; ``batch_flag`` names
    the flag whose batch the compiled model is fixed to."""
    g = ap.add_argument_group(
        ".pt engines only",
        "How a training checkpoint given as --engine X.pt runs. With a .plan, .onnx or .pt2 engine\n"
        "these flags are an error (exit 2): their precision and compilation were fixed by the export.",
    )
    g.add_argument(
        "--pt-precision",
        choices=PT_PRECISIONS,
        default=None,
        help="fp32 (default): the checkpoint as trained; fp16: weights and input in half precision, "
        "on a CUDA GPU only (the CPU runs fp16 convolutions several times slower than fp32)",
    )
    g.add_argument(
        "--pt-compile",
        action="store_true",
        help="torch.compile the model when it loads (tens of seconds or more; on a GPU its kernels are "
        f"replayed as a CUDA graph), for {batch_flag}: shorter batches are padded to it. "
        "--pt-precision fp16 --pt-compile is the fast way to serve a checkpoint on a GPU",
    )


def pt_options(args: argparse.Namespace, batch: int) -> dict[str, object]:
    """``load_engine``'s keyword arguments for the ``--pt-*`` flags given (none: ``{}``, eager
    FP32), ``batch`` the one a compiled model is fixed to. DataError naming the engine when they are
    given for an engine that is not a .pt."""
    given = [f for f, v in (("--pt-precision", args.pt_precision), ("--pt-compile", args.pt_compile)) if v]
    if not given:
        return {}
    suffix = os.path.splitext(args.engine)[1].lower()
    if suffix != ".pt":
        raise DataError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to .pt checkpoint engines only, "
            f"not to {args.engine} "
            f"(a {suffix or 'suffix-less'} engine runs at the precision and compilation of its export)"
        )
    return {"pt_precision": args.pt_precision, "pt_compile": args.pt_compile, "pt_batch": batch}
