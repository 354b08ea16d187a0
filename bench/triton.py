"""Online (Triton) against offline (serve.infer) on this machine: ``python -m bench.triton``.

For one engine and one set of images it measures

* offline: ``serve.infer`` over the images (batch ``--batch-size``), images/s end to end from
  its ``--summary``;
* online: ``serve.triton`` started on free loopback ports, then ``--requests`` requests of one
  image each at every ``--concurrency`` level (gRPC, ``tritonclient.grpc.aio``: that many requests
  in flight at all times), requests/s and latency p50/p99;

and prints one Markdown table with the ratio online / offline (the goal: at least 0.7 at
concurrency 32). Server, clients and the offline run share this machine's cores, so on a small
machine the client's own work counts against the server. One run, a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import cpu_name
from bench.report import parse_checked


def free_ports(n: int) -> list[int]:
    """``n`` loopback TCP ports free at the time of the call (the OS picks them; another process may
    take one before the caller binds it)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def server_command(engine: str | Path, ports: tuple[int, int, int], *extra: str) -> list[str]:
    """``python -m serve.triton`` for ``engine`` on the (HTTP, gRPC, metrics) ``ports``, then ``extra``."""
    http, grpc, metrics = ports
    return [
        sys.executable,
        "-m",
        "serve.triton",
        "--engine",
        str(engine),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        *extra,
    ]


def offline(engine: str, files: list[str], batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "summary.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "serve.infer",
                "--engine",
                engine,
                "--quiet",
                "--batch-size",
                str(batch_size),
                "--output",
                str(Path(tmp) / "p.jsonl"),
                "--summary",
                str(lst),
                *files,
            ],
            check=True,
        )
        return json.loads(lst.read_text())


async def load(port: int, payloads: list[bytes], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """``requests`` one-image requests, ``concurrency`` in flight; (seconds, latencies in s)."""
    import numpy as np
    import tritonclient.grpc.aio as ta

    client = ta.InferenceServerClient(f"127.0.0.1:{port}")
    lat: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < requests:
            i = next_i
            next_i += 1
            arr = np.array([[payloads[i % len(payloads)]]], dtype=object)
            inp = ta.InferInput("image", [1, 1], "BYTES")
            inp.set_data_from_numpy(arr)
            t = time.perf_counter()
            r = await client.infer("rn50", [inp])
            lat.append(time.perf_counter() - t)
            if r.as_numpy("error")[0, 0]:
                raise RuntimeError(f"request {i} failed: {r.as_numpy('error')[0, 0]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.triton",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--engine",
        default="artifacts/rn50.fp32.onnx",
        help="engine to serve and to run offline (default artifacts/rn50.fp32.onnx)",
    )
    ap.add_argument("--data", default="data/fashion-mnist/val", help="image folder (default data/fashion-mnist/val)")
    ap.add_argument(
        "--images", type=int, default=1024, help="images for the offline run and to draw requests from (default 1024)"
    )
    ap.add_argument("--requests", type=int, default=1024, help="requests per concurrency level (default 1024)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default 1 8 32)")
    ap.add_argument(
        "--batch-size", type=int, default=32, help="offline batch, and the server's largest dynamic batch (default 32)"
    )
    ap.add_argument(
        "--queue-delay-us", type=int, default=2000, help="the server's dynamic-batching delay (default 2000)"
    )
    args = parse_checked(ap, argv, may_be_zero=("--queue-delay-us",))  # 0: no batching delay, as serve.triton

    import numpy as np

    from rn50.layout import iter_inputs
    from rn50.metrics import percentiles

    files = [str(x) for x in iter_inputs([args.data])]
    if not files or not Path(args.engine).is_file():
        print(
            f"error: need images in {args.data} and the engine {args.engine} (make data; make export)", file=sys.stderr
        )
        return 2
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[: args.images]]
    # a 1,024-image offline run lasts a second or two, so one run's rate swings with the machine:
    # the median of three is the baseline
    runs = sorted((offline(args.engine, files, args.batch_size) for _ in range(3)), key=lambda r: r["images_per_s"])
    off = runs[1]

    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = tempfile.NamedTemporaryFile(prefix="bench-triton-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        server_command(
            args.engine,
            (http, grpc, metrics),
            "--max-batch",
            str(args.batch_size),
            "--queue-delay-us",
            str(args.queue_delay_us),
        ),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rows = []
    try:
        import tritonclient.http as th

        client = th.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"error: serve.triton did not come up (log: {log.name})", file=sys.stderr)
                return 2
            try:
                if client.is_model_ready("rn50"):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        payloads = [Path(f).read_bytes() for f in files]
        asyncio.run(load(grpc, payloads, 8, 64))  # warm-up
        for c in args.concurrency:
            n = args.requests if c > 1 else max(64, args.requests // 4)
            cpu0 = time.process_time()
            wall, lat = asyncio.run(load(grpc, payloads, c, n))
            # the client's own CPU: it shares this machine's cores with the server
            share = (time.process_time() - cpu0) / (wall * (os.cpu_count() or 1))
            pc = percentiles([x * 1000 for x in lat], (50, 99))
            rows.append((c, n, n / wall, pc["p50"], pc["p99"], share))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        os.unlink(log.name)

    ips = off["images_per_s"]
    print(
        f"\nmachine: {cpu_name()}, {os.cpu_count()} logical cores; engine {args.engine} ({off['backend']}, "
        f"{off['provider']}); {len(files)} images; offline batch {off['batch_size']}; server max batch "
        f"{args.batch_size}, queue delay {args.queue_delay_us} us\n"
    )
    print("| run | requests | images/s (requests/s) | p50 ms | p99 ms | online / offline | client's CPU share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rates = ", ".join(f"{r['images_per_s']:,.0f}" for r in runs)
    print(
        f"| offline serve.infer, batch {off['batch_size']} (median of 3 runs: {rates}) | {off['images']} | "
        f"{ips:,.1f} | | | 1.00 | |"
    )
    for c, n, rps, p50, p99, share in rows:
        print(
            f"| online serve.triton, concurrency {c} | {n} | {rps:,.1f} | {p50:.1f} | {p99:.1f} | {rps / ips:.2f} | "
            f"{100 * share:.0f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
