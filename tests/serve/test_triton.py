"""serve.triton: the live Triton server (PyTriton) on loopback, and the stock-Triton model repository."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.triton import free_ports, server_command
from tests.jpegs import bogus_huffman
from tests.stderr import error_line

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (`make setup` installs it)")


def need_pytriton() -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (`make setup` installs it)")


ROOT = Path(__file__).resolve().parents[2]
MAX_REQUEST_BYTES = 1_000_000


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Server:
    """``python -m serve.triton`` in a child process on free loopback ports: its stderr in ``log``,
    its stdout in ``out`` (beside it), ``env`` added to the environment. Once ready, ``python_env``
    is the /tmp/python_env_XXXXXX of its Triton Python backend (None when another server made one
    at the same time: then either could be it)."""

    def __init__(self, engine: Path, log: Path, *extra: str, env: dict[str, str] | None = None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log, self.out = log, log.with_suffix(".stdout")
        self.python_env: Path | None = None
        self._envs = set(Path("/tmp").glob("python_env_*"))
        self.proc = subprocess.Popen(
            server_command(engine, (self.http, self.grpc, self.metrics), *extra),
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
            stdout=open(self.out, "wb"),
            stderr=open(log, "wb"),
        )

    def wait_ready(self, timeout: float = 180) -> None:
        """Wait for the command's ``serving ...`` line; the model must answer ready by then (Triton's
        /v2/health/ready says 200 before PyTriton has loaded it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve.triton exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if any(ln.startswith("serving ") for ln in self.log.read_text().splitlines()):
                url = f"http://127.0.0.1:{self.http}/v2/models/rn50/ready"
                assert urllib.request.urlopen(url, timeout=10).status == 200
                new = set(Path("/tmp").glob("python_env_*")) - self._envs
                self.python_env = new.pop() if len(new) == 1 else None
                return
            time.sleep(0.5)
        raise AssertionError(f"serve.triton not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, set[int]]:
        """Send ``sig``; the exit status and the processes it had started that are still alive."""
        kids = descendants(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        return rc, {p for p in kids if alive(p)}


def infer_grpc(port: int, files: list[bytes]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    arr = np.array([[f] for f in files], dtype=object)
    inp = tg.InferInput("image", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    r = client.infer("rn50", [inp])
    return {k: r.as_numpy(k) for k in ("topk", "classes", "probs", "error")}


def offline(capsys, engine: Path, paths: list[Path]) -> dict[str, dict]:
    """serve.infer's records for ``paths``, by path."""
    from serve import infer

    infer.main(["--engine", str(engine), "--quiet", *map(str, paths)])
    return {(rec := json.loads(ln))["path"]: rec for ln in capsys.readouterr().out.splitlines() if ln.strip()}


@pytest.fixture(scope="module")
def images(fmnist_small, photos, tmp_path_factory) -> dict[str, list[Path]]:
    """Good images (Fashion-MNIST val + photographs) and bad ones (not an image, truncated, whole but
    undecodable, too big, too thin: a few hundred bytes whose resize would be hundreds of millions
    of pixels)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "text.jpg").write_bytes(b"this is not an image\n" * 10)
    data = photos["jpeg"].read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "corrupt.jpg").write_bytes(bogus_huffman(data))  # passes the header check, fails the decoder
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "big.png")  # incompressible: larger than MAX_REQUEST_BYTES
    assert (d / "big.png").stat().st_size > MAX_REQUEST_BYTES
    Image.new("L", (200_000, 1)).save(d / "thin.png")
    val = sorted((fmnist_small / "val").rglob("*.jpg"))[::25][:20]
    good = val + [photos[k] for k in ("jpeg", "png", "gray", "cmyk", "exif")]
    return {"good": good, "bad": [d / f for f in ("text.jpg", "truncated.jpg", "corrupt.jpg", "big.png", "thin.png")]}


@pytest.fixture(scope="module")
def server(engine_fp32_onnx, tmp_path_factory):
    need_pytriton()
    s = Server(
        engine_fp32_onnx,
        tmp_path_factory.mktemp("triton") / "server.log",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--queue-delay-us",
        "20000",
    )
    try:
        s.wait_ready()
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()


# --------------------------------------------------------------------------- live server


def test_predictions_equal_serve_infer(capsys, server, engine_fp32_onnx, images):
    good = images["good"]
    ref = offline(capsys, engine_fp32_onnx, good)
    out = infer_grpc(server.grpc, [p.read_bytes() for p in good])
    for row, p in enumerate(good):
        want = ref[str(p)]
        assert out["error"][row, 0] == b"", p
        assert out["topk"][row].tolist() == want["topk"], p
        assert [c.decode() for c in out["classes"][row]] == want["classes"], p
        np.testing.assert_allclose(out["probs"][row], want["probs"], atol=2e-6, err_msg=str(p))


def test_burst_with_bad_images_loses_no_answer(capsys, server, engine_fp32_onnx, images):
    """32 concurrent clients, 4 requests each, one image per request, a bad image in every fourth:
    every request is answered; each bad one names its cause, each good one is serve.infer's answer."""
    good, bad = images["good"], images["bad"]
    ref = offline(capsys, engine_fp32_onnx, good)
    plan = [
        [(bad[(c + j) % len(bad)] if (c + j) % 4 == 0 else good[(c * 4 + j) % len(good)]) for j in range(4)]
        for c in range(32)
    ]
    assert {p for row in plan for p in row if p in bad} == set(bad)  # each kind of bad image is sent
    answers: dict[tuple[int, int], dict[str, np.ndarray] | BaseException] = {}

    def client(c: int) -> None:
        for j, p in enumerate(plan[c]):
            try:
                answers[c, j] = infer_grpc(server.grpc, [p.read_bytes()])
            except BaseException as e:  # recorded and asserted below
                answers[c, j] = e

    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 32 * 4
    causes = {
        "text.jpg": "not an image",
        "truncated.jpg": "truncated JPEG file",
        "corrupt.jpg": "cannot decode image",
        "big.png": "request too large",
        "thin.png": "too thin",
    }
    for (c, j), a in answers.items():
        p = plan[c][j]
        assert not isinstance(a, BaseException), f"{p}: {a!r}"
        if p in bad:
            assert causes[p.name] in a["error"][0, 0].decode(), (p, a["error"])
            assert a["topk"][0].tolist() == [-1] * a["topk"].shape[1]
        else:
            assert a["error"][0, 0] == b"" and a["topk"][0].tolist() == ref[str(p)]["topk"], p
    assert server.proc.poll() is None  # still up


def test_endpoints_health_metrics_and_no_model_control(server):
    import urllib.error
    import urllib.request

    import tritonclient.http as th

    base = f"http://127.0.0.1:{server.http}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/rn50/ready"):
        assert urllib.request.urlopen(base + path, timeout=10).status == 200, path
    meta = json.load(urllib.request.urlopen(base + "/v2/models/rn50/config", timeout=10))
    assert meta["max_batch_size"] >= 1 and meta["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10).read().decode()
    assert 'nv_inference_request_success{model="rn50"' in metrics
    client = th.InferenceServerClient(f"127.0.0.1:{server.http}")
    with pytest.raises(Exception, match="restricted"):
        client.unload_model("rn50")
    assert client.is_model_ready("rn50")
    # Bound to loopback only: every listening socket of the three ports is on 127.0.0.1 (IPv4, or
    # IPv4-mapped IPv6), none on every interface.
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    listening: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for ln in Path(table).read_text().splitlines()[1:]:
            local, state = ln.split()[1], ln.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.rsplit(":", 1)
                listening.setdefault(int(port, 16), set()).add(addr)
    for port in (server.http, server.grpc, server.metrics):
        assert listening.get(port) and listening[port] <= loopback, f"port {port} listens on {listening.get(port)}"


def test_sigint_stops_everything(engine_fp32_onnx, tmp_path):
    """Also: --verbose prints Triton's log on stdout (without it, stdout stays empty: see
    test_server_that_exits_on_its_own_is_an_error_and_leaves_nothing)."""
    need_pytriton()
    s = Server(engine_fp32_onnx, tmp_path / "server.log", "--verbose")
    s.wait_ready()
    kids = descendants(s.proc.pid)
    assert any("tritonserver" in cmdline(p) for p in kids) and any("stub" in cmdline(p) for p in kids), [
        cmdline(p) for p in kids
    ]
    rc, left = s.stop(signal.SIGINT)
    assert rc == 0, s.log.read_text()[-2000:]
    assert not left, [cmdline(p) for p in left]
    assert f'Started HTTPService at 127.0.0.1:{s.http}"' in s.out.read_text()


def test_server_that_exits_on_its_own_is_an_error_and_leaves_nothing(engine_fp32_onnx, tmp_path):
    """A KServe request for Triton's classification extension on the BYTES output ``classes``
    kills Triton 2.51 (SIGFPE) under a running serve.triton: the command exits 1 with one error
    line naming how Triton ended, and nothing of the server is left: no process (the backend stub
    outlives such a tritonserver, ignores SIGTERM and holds the HTTP port), no model copy,
    workspace, shared memory or /tmp/python_env_XXXXXX, nothing in $TMPDIR. Without --verbose
    nothing but the command's own lines is printed. (Should a later Triton answer that request,
    tritonserver is killed instead.)"""
    need_pytriton()
    from tests.stderr import error_line

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    s = Server(engine_fp32_onnx, tmp_path / "server.log", env={"TMPDIR": str(tmp)})
    kids: set[int] = set()
    try:
        s.wait_ready()
        before_crash = s.log.read_text().splitlines()
        kids = descendants(s.proc.pid)
        (triton,) = [p for p in kids if Path(cmdline(p).split(" ")[0]).name == "tritonserver"]
        (stub,) = [p for p in kids if "triton_python_backend_stub" in cmdline(p)]
        argv = [Path(f"/proc/{stub}/cmdline").read_bytes().split(b"\0")[i].decode() for i in range(3)]
        workspace = Path(argv[0]).parents[4]  # <own>/workspace/tritonserver/backends/python/<stub>
        assert workspace.name == f"rn50_serve-{s.proc.pid}@{socket.gethostname()}", workspace
        model_copy = Path(argv[1]).parents[1]  # <model folder>/<version>/model.py
        shm_region = argv[2]
        assert workspace.is_dir() and model_copy.is_dir() and Path("/dev/shm", shm_region).exists(), argv
        body = {
            "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}],
            "outputs": [{"name": "classes", "parameters": {"classification": 3}}],
        }
        url = f"http://127.0.0.1:{s.http}/v2/models/rn50/infer"
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode()), timeout=30)
        except (urllib.error.URLError, OSError):
            pass  # the server died while answering
        try:
            rc = s.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            if alive(triton):
                os.kill(triton, signal.SIGKILL)
            try:
                rc = s.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rc = None
        deadline = time.monotonic() + 10
        while any(alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        err = s.log.read_text()
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        got = {
            "exit status": rc,
            "error lines": [ln.split(" (killed by SIG")[0] for ln in errors],
            "'stopped' printed": "stopped" in err.splitlines(),
            "processes left": [cmdline(p) for p in kids if alive(p)],
            "model copy left": model_copy.exists() and str(model_copy),
            "workspace left": workspace.exists() and str(workspace),
            "python_env left": s.python_env is not None and s.python_env.exists() and str(s.python_env),
            "shared memory left": sorted(f.name for f in Path("/dev/shm").glob(f"{shm_region}*")),
            "in $TMPDIR": sorted(f.name for f in tmp.iterdir() if f.name != ".ses"),  # onnxruntime's session id
            "lines before the crash": [ln for ln in before_crash if not ln.startswith("serving ")],
            "stdout": s.out.read_text()[-500:],
        }
        want = {
            "exit status": 1,
            "error lines": ["error: Triton Inference Server exited unexpectedly"],
            "'stopped' printed": False,
            "processes left": [],
            "model copy left": False,
            "workspace left": False,
            "python_env left": False,
            "shared memory left": [],
            "in $TMPDIR": [],
            "lines before the crash": [],
            "stdout": "",
        }
        wrong = {k: v for k, v in got.items() if v != want[k]}
        assert not wrong, f"{wrong}\n{err[-3000:]}"
        assert error_line(err) in [
            f"error: Triton Inference Server exited unexpectedly (killed by {sig})" for sig in ("SIGFPE", "SIGKILL")
        ]
    finally:
        for p in kids | ({s.proc.pid} if s.proc.poll() is None else set()):
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_compiled_checkpoint_serves_as_serve_infer(capsys, engine_checkpoint, images, tmp_path):
    """--pt-compile: the checkpoint is compiled for the largest dynamic batch (4) before the server
    is ready, and requests of 4 images (the compiled batch) and 3 (padded to it) get serve.infer's
    answers for the checkpoint."""
    need_pytriton()
    s = Server(engine_checkpoint, tmp_path / "server.log", "--pt-compile", "--max-batch", "4")
    try:
        s.wait_ready(timeout=300)
        good = images["good"][:7]
        full, short = (infer_grpc(s.grpc, [p.read_bytes() for p in part]) for part in (good[:4], good[4:]))
        out = {k: np.concatenate([full[k], short[k]]) for k in full}
    finally:
        rc, _ = s.stop()
    log = s.log.read_text()
    assert "torch.compile fp32" in log and "dynamic batches up to 4" in log, log[-2000:]
    assert rc == 0, log[-2000:]
    ref = offline(capsys, engine_checkpoint, good)
    for row, p in enumerate(good):
        assert out["error"][row, 0] == b"", p
        assert out["topk"][row].tolist() == ref[str(p)]["topk"], p
        np.testing.assert_allclose(out["probs"][row], ref[str(p)]["probs"], atol=1e-4, err_msg=str(p))


def test_sigterm_stops_everything(server):
    """Runs last in this module: stops the shared server with SIGTERM while a client holds an HTTP
    keep-alive connection. Triton then waits its whole exit timeout for the connection and exits
    without unloading the model; nothing of it is left all the same (processes, workspace, model
    copy, the Python backend's /tmp/python_env_XXXXXX)."""
    import http.client

    kids = descendants(server.proc.pid)
    assert any("tritonserver" in cmdline(p) for p in kids)
    (stub,) = [p for p in kids if "triton_python_backend_stub" in cmdline(p)]
    argv = cmdline(stub).split(" ")
    workspace = Path(argv[0]).parents[4]  # <own>/workspace/tritonserver/backends/python/<stub>
    assert workspace.name == f"rn50_serve-{server.proc.pid}@{socket.gethostname()}", workspace
    model_copy = Path(argv[1]).parents[1]  # <model folder>/<version>/model.py
    keep_alive = http.client.HTTPConnection("127.0.0.1", server.http, timeout=30)
    keep_alive.request("GET", "/v2/health/live")
    response = keep_alive.getresponse()
    response.read()
    assert response.status == 200 and not response.will_close
    try:
        rc, left = server.stop(signal.SIGTERM)
    finally:
        keep_alive.close()
    assert rc == 0, server.log.read_text()[-2000:]
    assert not left, [cmdline(p) for p in left]
    assert not workspace.exists() and not model_copy.exists(), (workspace, model_copy)
    assert not (server.python_env and server.python_env.exists()), server.python_env


def test_workspaces_of_killed_servers_are_removed_at_the_next_start(tmp_path):
    """A serve.triton killed outright leaves its workspace; the next start removes those of this
    host's processes that no longer exist, and no other (a live server's, another host's, one of
    a host whose name merely starts with this one's)."""
    need_pytriton()
    from serve.triton.server import new_workspace, remove_stale_workspaces, workspace_name

    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    own, ws = new_workspace(tmp_path)
    assert ws.path.parent == own and ws.model_store_path.is_dir()
    assert own.name == workspace_name(os.getpid(), host) == f"rn50_serve-{os.getpid()}@{host}"
    dead = tmp_path / workspace_name(gone.pid, host)
    (dead / "workspace" / "model-store").mkdir(parents=True)
    kept = [
        own,  # this (live) process's
        tmp_path / workspace_name(gone.pid, "otherhost"),  # another host's: its pids are not ours
        tmp_path / workspace_name(gone.pid, host + "_x"),
        tmp_path / f"rn50_serve-notapid@{host}",
        tmp_path / f"workspace_{gone.pid}",  # PyTriton's own naming: not this command's
    ]
    for d in kept[1:]:
        d.mkdir()
    assert remove_stale_workspaces(tmp_path) == [dead]
    assert not dead.exists() and all(d.is_dir() for d in kept)
    # a dead process's workspace under this process's pid (pid reuse) is replaced, not refused
    (own / "workspace" / "old").mkdir()
    own2, _ = new_workspace(tmp_path)
    assert own2 == own and not (own / "workspace" / "old").exists()


# --------------------------------------------------------------------------- usage errors


def test_bad_usage_exits_2(capsys, engine_fp32_onnx, tmp_path):
    from serve import triton

    assert triton.main(["--engine", str(tmp_path / "missing.onnx")]) == 2
    assert "error:" in capsys.readouterr().err
    assert triton.main(["--engine", str(engine_fp32_onnx), "--max-batch", "0"]) == 2
    assert error_line(capsys.readouterr().err) == "error: --max-batch 0: must be at least 1"
    for flags in (["--pt-compile"], ["--pt-precision", "fp32", "--write-repo", str(tmp_path / "repo")]):
        assert triton.main(["--engine", str(engine_fp32_onnx), *flags]) == 2
        assert "--pt-" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "repo").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert triton.main(["--engine", str(engine_fp32_onnx), "--grpc-port", str(port)]) == 2
    assert f"--grpc-port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_port_in_time_wait_is_accepted_a_listening_one_refused():
    """A port whose last connection is in TIME_WAIT (Triton just stopped with a client connected)
    is free for a new Triton, which binds with SO_REUSEADDR; the check must not refuse it.
    A port another socket listens on (with SO_REUSEADDR too, or on every interface) is refused."""
    from rn50.errors import EngineError
    from serve.triton.server import check_ports

    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton's listeners; its connections inherit it
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the side that closes first keeps the connection in TIME_WAIT
        cli.recv(1)
        cli.close()
    states = [
        ln.split()[3]
        for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if ln.split()[1] == f"0100007F:{port:04X}"
    ]
    assert "06" in states, states  # TIME_WAIT on 127.0.0.1:port
    check_ports("127.0.0.1", {"--http-port": port})
    for addr in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as busy:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            busy.bind((addr, 0))
            busy.listen()
            taken = busy.getsockname()[1]
            with pytest.raises(EngineError, match=f"--grpc-port {taken}: cannot listen on 127.0.0.1:{taken}"):
                check_ports("127.0.0.1", {"--grpc-port": taken})


def test_ports_out_of_range_or_shared_are_refused_before_triton_starts(capsys, tmp_path):
    """Refused before the engine is read (here it does not exist): Triton itself would print its
    usage text for a shared port and time out after minutes; Python's bind an OverflowError."""
    from serve import triton

    missing = str(tmp_path / "missing.onnx")
    assert triton.main(["--engine", missing, "--http-port", "99999"]) == 2
    assert error_line(capsys.readouterr().err) == "error: --http-port 99999: a port is a number from 1 to 65535"
    assert triton.main(["--engine", missing, "--http-port", "18010", "--grpc-port", "18010"]) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: --grpc-port 18010: --http-port is 18010 too; the three endpoints need three ports"
    )


# --------------------------------------------------------------------------- model repository


def test_write_repo_configs_parse_with_tritons_schema(engine_fp32_onnx, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from rn50.manifest import preprocessing_of, read_manifest
    from serve import triton
    from serve.triton.repo import dali_pipeline

    repo = tmp_path / "repo"
    assert (
        triton.main(
            [
                "--engine",
                str(engine_fp32_onnx),
                "--write-repo",
                str(repo),
                "--max-batch",
                "16",
                "--queue-delay-us",
                "500",
            ]
        )
        == 0
    )
    m = read_manifest(engine_fp32_onnx)
    p = preprocessing_of(m)
    # the engine's manifest travels with the repository (Triton ignores the file)
    assert json.loads((repo / "rn50_engine" / "manifest.json").read_text()) == m
    cfg = {d.name: text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig()) for d in repo.iterdir()}
    assert set(cfg) == {"rn50", "rn50_preprocess", "rn50_engine"}
    ens, pre, eng = cfg["rn50"], cfg["rn50_preprocess"], cfg["rn50_engine"]
    assert all(c.name == n for n, c in cfg.items())
    assert ens.platform == "ensemble" and pre.backend == "dali" and eng.platform == "onnxruntime_onnx"
    assert {c.max_batch_size for c in cfg.values()} == {16}
    assert eng.dynamic_batching.max_queue_delay_microseconds == 500
    for c in (pre, eng):
        assert [g.kind for g in c.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert list(eng.input[0].dims) == [3, p.image_size, p.image_size] == list(pre.output[0].dims)
    assert list(eng.output[0].dims) == [len(m["classes"])] == list(ens.output[0].dims)
    # The ensemble's wiring names real tensors of the models it joins.
    s1, s2 = ens.ensemble_scheduling.step
    assert (s1.model_name, s2.model_name) == ("rn50_preprocess", "rn50_engine")
    assert set(s1.input_map) == {i.name for i in pre.input} and set(s1.output_map) == {o.name for o in pre.output}
    assert set(s2.input_map) == {i.name for i in eng.input} and set(s2.output_map) == {o.name for o in eng.output}
    assert s1.output_map[pre.output[0].name] == s2.input_map[eng.input[0].name]
    assert s2.output_map[eng.output[0].name] == ens.output[0].name
    assert set(s1.input_map.values()) == {i.name for i in ens.input}
    for d in ("rn50", "rn50_engine"):
        assert (repo / d / "labels.txt").read_text().splitlines() == m["classes"]
    assert (repo / "rn50_engine" / "1" / "model.onnx").read_bytes() == engine_fp32_onnx.read_bytes()
    assert (repo / "rn50" / "1").is_dir()
    dali = (repo / "rn50_preprocess" / "1" / "model.dali").read_bytes()
    assert b"mixed" in dali  # GPU (nvJPEG) decoding
    assert dali == dali_pipeline(p, 16, decode="mixed").serialize()


def test_repo_dali_pipeline_on_cpu_equals_the_contract(engine_fp32_onnx, photos, fmnist_small):
    """The repository's DALI pipeline, serialized with CPU decoding, deserialized and run on real
    images, gives the tensors the offline preprocessing (rn50.batches.Preprocessor) gives."""
    from nvidia.dali import Pipeline

    from rn50.batches import Preprocessor
    from rn50.layout import read_encoded
    from rn50.manifest import preprocessing_of, read_manifest
    from serve.triton.repo import DALI_INPUT, dali_pipeline

    p = preprocessing_of(read_manifest(engine_fp32_onnx))
    files = [photos[k] for k in ("jpeg", "png", "gray", "cmyk", "exif")]
    files += sorted((fmnist_small / "val").rglob("*.jpg"))[:3]
    enc = [read_encoded(f) for f in files]
    pipe = Pipeline.deserialize(serialized_pipeline=dali_pipeline(p, len(files), decode="cpu").serialize())
    pipe.build()
    pipe.feed_input(DALI_INPUT, enc)
    (out,) = pipe.run()
    got = np.array(out.as_tensor())
    want = Preprocessor(p, len(files))(enc)
    assert got.shape == want.shape == (len(files), *p.input_shape)
    np.testing.assert_array_equal(got, want)


def test_write_repo_refuses(capsys, engine_fp32_onnx, engine_checkpoint, tmp_path):
    from serve import triton

    assert triton.main(["--engine", str(engine_checkpoint), "--write-repo", str(tmp_path / "r1")]) == 2
    assert "not '.pt'" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "keep").write_text("x")
    assert triton.main(["--engine", str(engine_fp32_onnx), "--write-repo", str(tmp_path / "r2")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [f.name for f in (tmp_path / "r2").iterdir()] == ["keep"]
    # another file under the engine's manifest: its preprocessing and labels would go into the repository
    other = tmp_path / "other" / engine_fp32_onnx.name
    other.parent.mkdir()
    other.write_bytes(engine_fp32_onnx.read_bytes() + b"\0")
    Path(f"{other}.manifest.json").write_bytes(Path(f"{engine_fp32_onnx}.manifest.json").read_bytes())
    assert triton.main(["--engine", str(other), "--write-repo", str(tmp_path / "r3")]) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {other} does not match its manifest")
    assert not (tmp_path / "r3").exists()


def test_engine_config_keeps_the_preferred_batch_within_max_batch():
    """A plan's profile prefers its opt batch (32 by default); with --max-batch below it the config
    must still load: Triton refuses a preferred_batch_size above max_batch_size."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from serve.triton.repo import engine_config

    io = {
        "platform": "tensorrt_plan",
        "input": "input",
        "input_type": "TYPE_FP32",
        "output": "logits",
        "output_type": "TYPE_FP32",
        "classes": 10,
        "opt_batch": 32,
    }
    for max_batch, want in ((16, [16]), (64, [32])):
        cfg = text_format.Parse(engine_config(io, 224, max_batch, 500), mc.ModelConfig())
        assert list(cfg.dynamic_batching.preferred_batch_size) == want
        assert all(b <= cfg.max_batch_size for b in cfg.dynamic_batching.preferred_batch_size)


def test_max_batch_is_the_engines_own_bound_else_the_fallback(engine_fp32_onnx, engine_checkpoint, tmp_path):
    """An engine that declares its bound is served up to it, the default cap's value included (a
    --batch-max 1024 export); only an engine that bounds nothing gets FALLBACK_MAX_BATCH."""
    import shutil

    from rn50.backends import DEFAULT_MAX_BATCH, load_engine
    from serve.triton import FALLBACK_MAX_BATCH, serving_max_batch

    def copy(max_batch):
        d = tmp_path / f"mb{max_batch}"
        d.mkdir()
        dst = d / engine_fp32_onnx.name
        shutil.copy(engine_fp32_onnx, dst)
        m = json.loads(Path(str(engine_fp32_onnx) + ".manifest.json").read_text())
        m.pop("max_batch", None)
        if max_batch:
            m["max_batch"] = max_batch
        Path(str(dst) + ".manifest.json").write_text(json.dumps(m))
        return load_engine(dst, prefer_gpu=False)[0]

    declared = copy(DEFAULT_MAX_BATCH)
    assert declared.max_batch_declared and serving_max_batch(declared, None) == DEFAULT_MAX_BATCH
    assert serving_max_batch(declared, 16) == 16
    assert serving_max_batch(copy(200), None) == 200
    unbounded = copy(None)
    assert not unbounded.max_batch_declared and serving_max_batch(unbounded, None) == FALLBACK_MAX_BATCH
    ckpt = load_engine(engine_checkpoint, prefer_gpu=False)[0]
    assert serving_max_batch(ckpt, None) == FALLBACK_MAX_BATCH
