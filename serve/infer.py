"""Classify images with an exported engine: ``python -m serve.infer --engine X INPUT...``.

* The engine is picked by suffix: ``.plan`` (TensorRT), ``.onnx`` (ONNX Runtime), ``.pt2``
  (AOTInductor), or a training checkpoint ``.pt`` (eager PyTorch FP32: no export, not the fast
  path; ``--pt-precision fp16 --pt-compile`` makes it FP16 torch.compile with CUDA graphs on a
  GPU, ``.pt`` engines only). The preprocessing (image size, resize, mean/std) and the class names come from
  the manifest beside the engine (``X.manifest.json``), never from flags.
* Preprocessing is DALI's (``rn50.batches``): ``mixed`` nvJPEG decoding and GPU resizing when CUDA
  is available (the batch stays on the GPU and feeds the engine without a host copy), the CPU
  otherwise; ``--decode-on cpu`` keeps decoding on the CPU while the engine runs on the GPU (the
  batch is copied over), to compare the two or to spare the GPU. A background thread decodes the
  next batch while the engine runs this one.
* Inputs: files and folders (recursive, sorted). JPEG, PNG, BMP, TIFF, WebP; grayscale is
  replicated to RGB and CMYK converted; the EXIF orientation tag is applied (DALI
  ``adjust_orientation=True``, as in training and as ``PIL.ImageOps.exif_transpose`` in the
  PIL reference).
* Output: one JSON line per image, in input order:
  ``{"path", "topk": [class indices], "classes": [names], "probs": [softmax probabilities]}``,
  or ``{"path", "error": "<cause>"}`` for an image that could not be classified (unreadable,
  empty, not an image, a format DALI does not decode such as GIF, corrupt or truncated, more than
  --max-pixels pixels, or so thin that its resize would exceed --max-pixels). Bad images never
  stop the job. A folder that cannot be listed (no permission, an I/O error) gets a line
  ``{"path": folder, "error"}`` of its own, first, and makes the exit status 1. With
  ``--output FILE`` the lines go to a temporary file beside FILE that is renamed onto FILE only
  when the run completes, so a crash never leaves a partial FILE.
* Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set, one GPU per rank: ``LOCAL_RANK``) each rank
  takes its contiguous share of the sorted input list and writes ``STEM.rankR-of-N.SUFFIX`` (from
  ``--output FILE``, required there); concatenating those files in rank order gives the lines of
  a single-process run.
* stderr: a progress bar and a summary (images, failures, images/s, per-batch engine latency
  p50/p95/p99, backend and provider); ``--quiet`` turns both off. ``--summary FILE`` writes the
  summary as JSON too (what ``bench.gpu_check`` reads).

Exit status: 0 every image classified, 1 some images failed or a folder could not be listed,
2 usage or engine error (missing engine, missing or mismatched manifest, plan for another GPU /
TensorRT version, no inputs, an --output or --summary path that cannot be written: checked before
any image is read), 141 the reader of stdout went away (``| head -1``; quietly, as a command
ended by SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rn50.errors import DataError
from rn50.flags import AT_LEAST_1

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe


# Every numeric flag (rn50/flags.py): checked before any image is read.
FLAG_RANGES = {"--batch-size": AT_LEAST_1, "--topk": AT_LEAST_1, "--max-pixels": AT_LEAST_1}


def read_list(source: str) -> list[str]:
    """The paths listed in ``source`` (a file, or ``-`` for standard input), one per line; empty
    lines are skipped, and nothing else is stripped (a name may begin or end with a space). Names
    that are not valid UTF-8 survive as the file system's bytes (surrogate escapes)."""
    if source == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    else:
        text = Path(source).read_bytes().decode("utf-8", "surrogateescape")
    return [ln.removesuffix("\r") for ln in text.split("\n") if ln.removesuffix("\r")]


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_batch_size, add_device, add_engine, add_max_pixels, add_pt_options, add_topk, new_parser

    ap = new_parser(
        "serve.infer",
        "Classify images with an exported ResNet50 engine (.plan, .onnx, .pt2) or a checkpoint (.pt); "
        "DALI preprocessing from the engine's manifest; one JSON line per image.",
        "exit status: 0 all images classified; 1 some images failed or a folder could not be listed "
        '(each has an "error" line); '
        "2 usage or engine error (missing engine or manifest, manifest mismatch, plan built for "
        "another GPU/TensorRT, no input images, an output path that cannot be written); 141 the reader of "
        "stdout closed the pipe (| head).\nSee docs/serving.md.",
    )
    add_engine(
        ap,
        "engine file: .plan (TensorRT), .onnx (ONNX Runtime), .pt2 (AOTInductor) or a "
        "training checkpoint .pt (PyTorch: eager FP32, or see --pt-precision and --pt-compile), "
        "with its .manifest.json beside it",
    )
    ap.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders (searched recursively)")
    ap.add_argument(
        "--files-from",
        metavar="LIST",
        help="also take the inputs listed in the text file LIST, one path per line ('-': standard input), "
        "for more files than a command line holds: find imgs/ -name '*.jpg' | python -m serve.infer "
        "--engine X --files-from -",
    )
    add_batch_size(ap, 32, "images per batch (default 32; clipped to the engine's maximum)")
    add_topk(ap, "classes reported per image (default 5; clipped to the number of classes)")
    ap.add_argument(
        "--output",
        help="write the JSON lines to this file (atomically, at the end) instead of stdout; "
        "under torchrun (required there) rank R of N writes preds.rankR-of-N.jsonl "
        "for --output preds.jsonl",
    )
    add_device(ap, "where DALI decodes/preprocesses and the engine runs (default auto: gpu when CUDA is available)")
    ap.add_argument(
        "--decode-on",
        choices=["auto", "cpu"],
        default="auto",
        help="auto: DALI decodes where the engine runs (nvJPEG on the GPU); cpu: DALI decodes on the CPU "
        "and the batch is copied to the engine's GPU",
    )
    add_max_pixels(
        ap,
        "refuse images larger than this many pixels, as stored or once resized to the "
        "engine's resize size (a very thin image); default 100,000,000",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")
    ap.add_argument(
        "--summary",
        metavar="FILE",
        help="also write the summary as JSON to FILE (images, failed, seconds, "
        "images_per_s, first_batch_s, images_per_s_after_first_batch, batch_size, "
        "latency_ms p50/p95/p99, backend, provider, dali_device, engine_device)",
    )
    add_pt_options(ap)
    return ap


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def torchrun_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's ``RANK`` / ``WORLD_SIZE``; ``(0, 1)`` outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_share(paths: list[str], rank: int, world: int) -> list[str]:
    """This rank's contiguous block of ``paths``: the blocks of ranks 0..world-1, concatenated in
    rank order, are ``paths`` in order (so the ranks' files, concatenated, are one run's lines)."""
    n = len(paths)
    return paths[rank * n // world : (rank + 1) * n // world]


def rank_file(path: str, rank: int, world: int) -> str:
    """``preds.jsonl`` -> ``preds.rank03-of-16.jsonl`` (zero-padded, so a sorted glob is rank order)."""
    p = Path(path)
    width = len(str(world - 1))
    return str(p.with_name(f"{p.stem}.rank{rank:0{width}d}-of-{world}{p.suffix}"))


def pin_local_gpu() -> None:
    """Under torchrun, make this rank see only its own GPU (``LOCAL_RANK``-th of the visible ones),
    before anything initialises CUDA: every backend and DALI then use "GPU 0", which is its own."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
        if len(ids) > int(local):
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[int(local)]
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = local


@contextlib.contextmanager
def _sink(output: str | None) -> Iterator[IO[str]]:
    if output is None:
        yield sys.stdout
        return
    from rn50.atomic import atomic_path

    try:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            yield f
    except OSError as e:  # a full disk, a folder gone: one error line, not a traceback after the work
        if isinstance(e, BrokenPipeError):  # stderr's reader gone (the progress bar): main's SIGPIPE exit
            raise
        raise DataError(f"--output {output}: cannot write it ({e.strerror or e})") from e


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # The reader of stdout went away (``| head -1``): stop quietly, with the status of a command
        # ended by SIGPIPE; stdout goes to /dev/null so the interpreter's final flush cannot fail again.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (in-process callers)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _dispatch(argv: list[str] | None) -> int:
    rank, world = torchrun_rank()
    if world == 1:
        return classify(argv)
    # Under torchrun a rank that exits non-zero (some images failed) makes torchrun stop the others:
    # every rank waits at a barrier until all have written their files.
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return classify(argv, rank, world)
    finally:
        dist.barrier()
        dist.destroy_process_group()


_OUTPUT: dict[str, str | None] = {}  # this process's --output, for the interruption message


def what_is_kept() -> str:
    """What an interrupted run leaves: no --output file (it appears only when complete), or, on
    stdout, the lines printed so far, each complete."""
    if _OUTPUT.get("output"):
        return "an --output file appears only when its run completes: none was written"
    return "the lines already printed are complete; the images after them were not classified"


def classify(argv: list[str] | None = None, rank: int = 0, world: int = 1) -> int:
    """serve.infer's work for one process (rank ``rank`` of ``world``)."""
    args = build_parser().parse_args(argv)
    _OUTPUT["output"] = args.output
    if world > 1:
        if not args.output:
            err(
                f"under torchrun (WORLD_SIZE={world}) give --output FILE: "
                "each rank writes its own STEM.rankR-of-N.SUFFIX"
            )
            return EXIT_USAGE
        if args.files_from == "-":
            # torchrun's processes share one standard input: each would read an unknown part of it
            err("--files-from -: under torchrun each rank needs the whole list; give a file (--files-from LIST)")
            return EXIT_USAGE
        pin_local_gpu()
        args.output = rank_file(args.output, rank, world)
        if args.summary:
            args.summary = rank_file(args.summary, rank, world)
    from rn50.backends import load_engine, topk
    from rn50.errors import PipelineError
    from rn50.layout import iter_inputs
    from rn50.manifest import preprocessing_of
    from rn50.metrics import percentiles

    from .cli import check_outputs, env_threads, pick_device, pt_options, usage_problem
    from .pipeline import MAX_PIXELS, BatchStream

    why = usage_problem(args, FLAG_RANGES)
    if why:
        err(why)
        return EXIT_USAGE
    # before any work, not after it; never onto the engine, its manifest or an input named here
    from rn50.manifest import manifest_path

    bad_output = check_outputs(
        {"output": args.output, "summary": args.summary},
        keep=[
            ("the engine", args.engine),
            ("the engine's manifest", str(manifest_path(args.engine))),
            ("the --files-from list", args.files_from if args.files_from != "-" else None),
            *(("an input", str(i)) for i in args.inputs),
        ],
    )
    if bad_output:
        err(bad_output)
        return EXIT_USAGE
    try:
        pt = pt_options(args, args.batch_size)
        device = pick_device(args.device)
        backend, manifest = load_engine(args.engine, prefer_gpu=device == "gpu", **pt)
        p = preprocessing_of(manifest)
    except PipelineError as e:
        err(str(e))
        return EXIT_USAGE
    if device == "gpu" and backend.device != "cuda":
        device = "cpu"  # the engine runs on the CPU (e.g. a CPU AOTInductor package): decode there too
    if args.decode_on == "cpu":
        device = "cpu"  # every backend takes a host batch and copies it to its own device
    inputs = list(args.inputs)
    if args.files_from:
        try:
            inputs += read_list(args.files_from)
        except OSError as e:
            err(f"--files-from {args.files_from}: cannot read it ({e.strerror or e})")
            return EXIT_USAGE
    if not inputs:
        err(
            "no input images given (pass image files and/or folders, or --files-from LIST)"
            if not args.files_from
            else f"--files-from {args.files_from}: lists no paths"
        )
        return EXIT_USAGE
    # stops at the first input that exists: a --files-from list may name millions of files
    if not any(Path(i).exists() or Path(i).is_symlink() for i in inputs):
        err(f"no such file or folder: {', '.join(inputs[:5])}{' ...' if len(inputs) > 5 else ''}")
        return EXIT_USAGE
    # a folder that cannot be listed gets an "error" line of its own, and exit status 1
    unlisted: list[dict[str, str]] = []
    paths = [
        str(x)
        for x in iter_inputs(
            inputs,
            unreadable=lambda d, e: unlisted.append(
                {"path": d, "error": f"cannot list this folder ({e.strerror or e}); its images were left out"}
            ),
        )
    ]
    if not paths:
        err(
            f"no image files found in {', '.join(inputs[:5])}{' ...' if len(inputs) > 5 else ''}"
            + "".join(f"; {u['path']}: {u['error']}" for u in unlisted[:5])
        )
        return EXIT_USAGE
    if rank > 0:
        unlisted = []  # every rank scanned the same folders: rank 0 reports them
    # the inputs found in folders and --files-from lists, compared by name (no call per file)
    found = {os.path.abspath(x) for x in paths} if args.output or args.summary else set()
    for flag, out_path in (("--output", args.output), ("--summary", args.summary)):
        if out_path and {os.path.abspath(out_path), os.path.realpath(out_path)} & found:
            err(f"{flag} {out_path}: is an input, which this command reads or writes; give another file")
            return EXIT_USAGE
    if world > 1:
        paths = rank_share(paths, rank, world)  # empty for some ranks when there are fewer files than ranks

    classes: list[str] = manifest["classes"]
    k = min(args.topk, len(classes))
    bs = min(args.batch_size, backend.max_batch)
    stream = BatchStream(
        paths,
        p,
        bs,
        device=device,
        max_pixels=args.max_pixels or MAX_PIXELS,
        num_threads=env_threads(),
        fp16=backend.input_dtype == "float16",
    )
    from tqdm import tqdm

    lat: list[float] = []
    n_ok = n_bad = 0
    first: tuple[float, int] | None = None  # (seconds, images) when the first batch's lines were written
    t0 = time.perf_counter()
    try:
        with (
            _sink(args.output) as out,
            tqdm(total=len(paths), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar,
        ):
            for rec in unlisted:
                out.write(json.dumps(rec) + "\n")
            for b in stream:
                recs: list[tuple[int, dict[str, object]]] = [
                    (i, {"path": pth, "error": cause}) for i, pth, cause in b.errors
                ]
                if b.x is not None and b.indices:
                    t = time.perf_counter()
                    logits = backend.run(b.x)
                    lat.append(time.perf_counter() - t)
                    top, top_probs = topk(logits, k)
                    for row, (i, pth) in enumerate(zip(b.indices, b.paths)):
                        idx = [int(c) for c in top[row]]
                        recs.append(
                            (
                                i,
                                {
                                    "path": pth,
                                    "topk": idx,
                                    "classes": [classes[c] for c in idx],
                                    "probs": [round(float(q), 6) for q in top_probs[row]],
                                },
                            )
                        )
                recs.sort(key=lambda r: r[0])
                for _, rec in recs:
                    out.write(json.dumps(rec) + "\n")
                if args.output is None:
                    out.flush()
                n_ok += len(b.indices)
                n_bad += len(b.errors)
                if first is None:
                    first = (time.perf_counter() - t0, n_ok + n_bad)
                bar.update(len(b.indices) + len(b.errors))
    except PipelineError as e:
        err(str(e))
        return EXIT_USAGE
    wall = time.perf_counter() - t0
    pc = percentiles([x * 1000 for x in lat])
    # The rate after the first batch: the first one also pays for starting DALI (nvJPEG, its
    # buffers) and the engine's first call, which weigh on a short run's overall rate
    after_first = None
    if first is not None and len(paths) > first[1] and wall > first[0]:
        after_first = (len(paths) - first[1]) / (wall - first[0])
    if args.summary:
        from rn50.atomic import write_json

        summary = {
            "engine": str(args.engine),
            "images": len(paths),
            "classified": n_ok,
            "failed": n_bad,
            "unlisted_folders": [u["path"] for u in unlisted],
            "seconds": wall,
            "images_per_s": len(paths) / wall if wall > 0 else 0.0,
            "first_batch_s": first[0] if first else None,
            "images_per_s_after_first_batch": after_first,
            "batch_size": bs,
            "batches": len(lat),
            "latency_ms": {k: v if v == v else None for k, v in pc.items()},  # no NaN in JSON
            "backend": backend.name,
            "provider": backend.provider,
            "dali_device": device,
            "engine_device": backend.device,
        }
        try:
            write_json(args.summary, summary)
        except OSError as e:
            err(f"--summary {args.summary}: cannot write it ({e.strerror or e})")
            return EXIT_USAGE
    if not args.quiet:
        print(
            f"summary: {len(paths)} images, {n_ok} classified, {n_bad} failed in {wall:.2f} s "
            f"({len(paths) / wall if wall > 0 else 0:.1f} images/s end to end); batch {bs}, "
            f"{len(lat)} batches, engine latency per batch p50 {pc['p50']:.1f} ms, p95 {pc['p95']:.1f} ms, "
            f"p99 {pc['p99']:.1f} ms; backend {backend.name} ({backend.provider}), DALI on {device}"
            + (f"; {len(unlisted)} folder(s) could not be listed" if unlisted else "")
            + (f"; predictions in {args.output}" if args.output else ""),
            file=sys.stderr,
        )
    return EXIT_SOME_FAILED if n_bad or unlisted else EXIT_OK


if __name__ == "__main__":
    from rn50.interrupt import run_command

    sys.exit(run_command(main, what_is_kept))
