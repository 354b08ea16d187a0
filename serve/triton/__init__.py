"""Serve an engine on Triton Inference Server: ``python -m serve.triton --engine X``.

* Live server (default): starts Triton through PyTriton on this machine with model ``rn50``:
  input ``image`` (BYTES, one encoded image file per row, so clients send files, not tensors),
  outputs ``topk`` (class indices), ``classes`` (names, top-1 first), ``probs`` (softmax
  probabilities) and ``error`` (empty, or why that row could not be classified). The engine
  (``.plan``, ``.onnx``, ``.pt2``, ``.pt``) and the DALI preprocessing are the offline path's
  (``rn50.backends``, ``rn50.batches``), read from the engine's manifest. Dynamic batching up to
  the engine's maximum batch; KServe v2 HTTP and gRPC, Prometheus metrics, health endpoints
  (``/v2/health/live``; ``/v2/models/rn50/ready`` for readiness: ``/v2/health/ready`` answers
  before the model is loaded); the ``serving ...`` line comes once the model is ready. It
  listens on 127.0.0.1 unless ``--host`` says otherwise, clients cannot load or unload models
  (PyTriton restricts the model-repository API to its own access token), and an image over
  ``--max-request-bytes`` is refused before decoding.
  SIGINT / SIGTERM stop the server and its backend stub processes before the command exits;
  Triton's own log goes to stdout with ``--verbose`` only. Should ``tritonserver`` exit on its
  own, the command ends what is left of it and exits 1 with the last lines of its log.
* ``--write-repo DIR``: writes a model repository for a stock ``tritonserver`` instead (see
  :mod:`serve.triton.repo`): a DALI model, the engine model and the ensemble joining them.

Exit status: 0 stopped by a signal (or the repository written), 1 the server exited on its own,
2 usage or engine error (a server that fails to start included).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rn50.flags import AT_LEAST_1, PORT, Range

EXIT_OK, EXIT_SERVER_EXITED, EXIT_USAGE = 0, 1, 2
FALLBACK_MAX_BATCH = (
    64  # for an engine that bounds its batch nowhere (a .pt, a dynamic ONNX without a manifest max_batch)
)


def serving_max_batch(backend: Any, requested: int | None) -> int:
    """The largest batch Triton forms: ``--max-batch`` where given (checked against the engine
    beforehand), else the engine's own bound (fixed batch, plan profile, manifest), else
    FALLBACK_MAX_BATCH for an engine that bounds nothing."""
    if requested:
        return int(requested)
    return int(backend.max_batch if backend.max_batch_declared else min(backend.max_batch, FALLBACK_MAX_BATCH))


# Every numeric flag (rn50/flags.py): checked before the engine loads or a port is bound.
FLAG_RANGES = {
    "--http-port": PORT,
    "--grpc-port": PORT,
    "--metrics-port": PORT,
    "--max-batch": AT_LEAST_1,
    "--queue-delay-us": Range(lo=0),
    "--topk": AT_LEAST_1,
    "--max-request-bytes": AT_LEAST_1,
    "--max-pixels": AT_LEAST_1,
    "--model-version": AT_LEAST_1,
}


def build_parser() -> argparse.ArgumentParser:
    from serve.cli import add_device, add_engine, add_max_pixels, add_pt_options, add_topk, new_parser

    from .model import DEFAULT_MAX_REQUEST_BYTES

    ap = new_parser(
        "serve.triton",
        "Serve a ResNet50 engine (.plan, .onnx, .pt2, .pt) on Triton Inference Server (PyTriton) with "
        "the manifest's DALI preprocessing; or write a model repository for a stock tritonserver.",
        "exit status: 0 stopped by SIGINT/SIGTERM (or repository written); 1 the server exited on its "
        "own; 2 usage or engine error.\n"
        "See docs/serving.md.",
    )
    add_engine(ap, "engine file (.plan, .onnx, .pt2, or a checkpoint .pt) with its .manifest.json beside it")
    ap.add_argument(
        "--write-repo",
        metavar="DIR",
        help="write a Triton model repository for this engine to DIR "
        "(DALI model + engine model + ensemble + labels) and exit; "
        "only .plan and .onnx engines",
    )
    ap.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the HTTP, gRPC and metrics endpoints bind to (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    ap.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port (default 8000)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (default 8001)")
    ap.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="largest dynamic batch in images (default: the engine's maximum batch from its profile or "
        f"manifest, {FALLBACK_MAX_BATCH} where the engine sets no bound); at most the engine's "
        "maximum",
    )
    ap.add_argument(
        "--queue-delay-us",
        type=int,
        default=2000,
        help="how long (microseconds) Triton may hold a request to fill a larger batch (default 2000)",
    )
    add_topk(ap, "classes returned per image (default 5; clipped to the number of classes)")
    ap.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"encoded images larger than this are refused before decoding (default {DEFAULT_MAX_REQUEST_BYTES:,})",
    )
    add_max_pixels(ap, "images with more pixels than this are refused from their header (default 100,000,000)")
    add_device(ap, "live server: where DALI and the engine run (default auto: gpu when CUDA is available)")
    ap.add_argument(
        "--model-version",
        type=int,
        default=None,
        help="Triton model version (default: the manifest's model_version, else 1)",
    )
    ap.add_argument(
        "--verbose",
        action="store_true",
        help="Triton's log, verbose, on stdout (without it only this command's own lines are printed)",
    )
    add_pt_options(ap, batch_flag="the largest dynamic batch (--max-batch)")
    return ap


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rn50.errors import PipelineError
    from serve.cli import usage_problem

    why = usage_problem(args, FLAG_RANGES)
    if why:
        err(why)
        return EXIT_USAGE
    if args.write_repo:
        if args.pt_precision or args.pt_compile:
            err(
                "--pt-precision and --pt-compile choose how the live server runs a .pt engine; --write-repo "
                "writes a repository for .plan and .onnx engines only"
            )
            return EXIT_USAGE
        from .repo import write_repo

        try:
            out = write_repo(
                args.engine,
                args.write_repo,
                max_batch=args.max_batch,
                queue_delay_us=args.queue_delay_us,
                version=args.model_version,
            )
        except PipelineError as e:
            err(str(e))
            return EXIT_USAGE
        print(
            f"model repository written to {out} (start it with: tritonserver --model-repository {out})", file=sys.stderr
        )
        return EXIT_OK

    from rn50.backends import load_engine
    from serve.cli import env_threads, pick_device, pt_options

    from .model import Classifier
    from .server import MODEL_NAME, TritonExited, check_ports, serve, stub_env

    try:
        device = pick_device(args.device)
        check_ports(
            args.host,
            {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port},
        )
        # a compiled .pt is fixed to one batch: the largest Triton forms (a .pt bounds none itself)
        pt = pt_options(args, args.max_batch or FALLBACK_MAX_BATCH)
        backend, manifest = load_engine(args.engine, prefer_gpu=device == "gpu", **pt)
        stub_env()
    except PipelineError as e:
        err(str(e))
        return EXIT_USAGE
    if device == "gpu" and backend.device != "cuda":
        device = "cpu"
    if args.max_batch is not None and args.max_batch > backend.max_batch:
        err(f"--max-batch {args.max_batch} exceeds the engine's maximum batch {backend.max_batch} ({args.engine})")
        return EXIT_USAGE
    max_batch = serving_max_batch(backend, args.max_batch)
    version = args.model_version or int(manifest.get("model_version") or 1)
    clf = Classifier(
        backend,
        manifest,
        max_batch,
        topk=args.topk,
        device=device,
        max_bytes=args.max_request_bytes,
        max_pixels=args.max_pixels,
        num_threads=env_threads(),
    )

    def ready() -> None:
        print(
            f"serving {args.engine} as model '{MODEL_NAME}' version {version} ({backend.name}, "
            f"{backend.provider}; DALI on {device}; dynamic batches up to {max_batch}) on "
            f"http://{args.host}:{args.http_port} grpc {args.host}:{args.grpc_port} "
            f"metrics http://{args.host}:{args.metrics_port}/metrics; SIGINT or SIGTERM stops it",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(
            clf,
            version=version,
            max_batch=max_batch,
            queue_delay_us=args.queue_delay_us,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            verbose=args.verbose,
            on_ready=ready,
        )
    except TritonExited as e:
        if not args.verbose and e.log_tail:  # with --verbose the whole log is on stdout already
            print("Triton's last log lines:", *(f"  {ln}" for ln in e.log_tail), sep="\n", file=sys.stderr)
        err(str(e))
        return EXIT_SERVER_EXITED
    except PipelineError as e:
        err(str(e))
        return EXIT_USAGE
    print("stopped", file=sys.stderr)
    return EXIT_OK
