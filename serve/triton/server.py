"""Run :class:`serve.triton.model.Classifier` behind Triton Inference Server through PyTriton.

PyTriton (``nvidia-pytriton``) ships the ``tritonserver`` binary and its Python backend. Triton
talks to the model through a small proxy that runs in the backend's *stub* process; the model
function itself runs here, in this process. Two facts about that stub shape this module:

* The stub embeds ``libpython3.X.so`` and finds it on the library path. With a Python that is
  not the system's (pyenv, conda, a source build) it loaded the system's library and crashed
  ("'_thread.RLock' object has no attribute '_recursion_count'"); :func:`triton_env` puts the
  running interpreter's own ``LIBDIR`` first.
* The stub of Triton 2.51 is built against numpy 1 (pybind11 without numpy 2 support): under
  numpy 2 it sends empty output tensors. Only the proxy runs there (it needs ``numpy`` and
  ``zmq``), so ``make setup`` gives it a small environment of its own with ``numpy<2``
  (``.venv/triton-stub``, :func:`stub_env`) while this process keeps the project's numpy 2.

What the server leaves behind is this module's job too. A stub outlives a ``tritonserver`` that
dies (it ignores SIGTERM and holds the HTTP port), so :func:`serve` makes this process the
*subreaper* of everything Triton starts and ends what is left of it on every way out
(:func:`end_leftovers`). The model goes into PyTriton's own workspace (a local model store, which
PyTriton removes when it stops), not through Triton's load API, which copies it to a
``/tmp/folderXXXXXX`` of Triton's that only a clean unload removes; the Python backend's
shared-memory region (``/dev/shm/<prefix>*``) and its empty ``/tmp/python_env_XXXXXX`` are
removed here as well. A clean shutdown is not the rule: Triton first waits for clients' HTTP
connections to close, and a single keep-alive client uses up the whole exit timeout, after which
``tritonserver`` exits without unloading the model (its stub then lingers, its files stay).
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from rn50.errors import EngineError

MODEL_NAME = "rn50"
STUB_ENV_VAR = "RN50_TRITON_STUB_ENV"
READY_TIMEOUT_S = 120.0  # for the model to answer ready once PyTriton has started the server (its own bound)
LOG_TAIL_LINES = 20  # of Triton's log, shown when it exits on its own
LOG_KEPT_CHARS = 64 * 1024  # of Triton's log, kept for those lines
LEFTOVER_GRACE_S = 3.0  # how long a process of the server's may take to exit before it is killed
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
PYTHON_ENV_DIR = "/tmp"  # where Triton's Python backend makes its python_env_XXXXXX (TMPDIR is not read)


class TritonExited(Exception):
    """The server ended without being asked to: ``tritonserver`` exited (``status`` is its exit
    status, negative for the signal that ended it, None when unknown), or with ``server=False``
    the model's backend did while the server ran on. ``log_tail``: the last lines of Triton's log."""

    def __init__(self, status: int | None, log_tail: list[str], server: bool = True):
        self.status, self.log_tail = status, log_tail
        super().__init__(
            f"Triton Inference Server exited unexpectedly ({describe_status(status)})"
            if server
            else f"the Triton backend of model '{MODEL_NAME}' exited unexpectedly; the server is stopped"
        )


def describe_status(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def stub_env() -> Path:
    """The Python environment the Triton Python-backend stub runs in.

    With numpy 1 here, this environment; with numpy 2, ``$RN50_TRITON_STUB_ENV`` or
    ``<venv>/triton-stub`` (made by ``make setup``), which must hold ``numpy<2`` and ``pyzmq``.
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        return Path(sys.exec_prefix)
    env = Path(os.environ.get(STUB_ENV_VAR) or Path(sys.prefix) / "triton-stub")
    if not (env / "bin" / "python3").exists():
        raise EngineError(
            f"{env}: no Python environment for Triton's backend stub (numpy is {np.__version__} "
            f"here and Triton 2.51's stub needs numpy<2): run `make setup`, or create it with "
            f"`python3 -m venv {env} && {env}/bin/pip install 'numpy<2' pyzmq` "
            f"(or point {STUB_ENV_VAR} at one)"
        )
    return env


def triton_env() -> None:
    """Put this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` for the server and its stubs
    (PyTriton copies this process's environment when it starts ``tritonserver``)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if not parts or parts[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in parts if p != libdir]])


def triton_config(host: str, http_port: int, grpc_port: int, metrics_port: int, verbose: bool = False) -> Any:
    """Triton's settings: every endpoint bound to ``host`` (Triton's own default is all interfaces)."""
    from pytriton.triton import TritonConfig

    return TritonConfig(
        http_address=host,
        http_port=http_port,
        grpc_address=host,
        grpc_port=grpc_port,
        metrics_address=host,
        metrics_port=metrics_port,
        log_verbose=1 if verbose else 0,
        exit_timeout_secs=10,
    )


def make_triton(config: Any, workspace: Any, verbose: bool) -> Any:
    """PyTriton's ``Triton`` as this command needs it (PyTriton 0.7's hooks):

    * The end of Triton's log is kept (its last lines go with the message when it exits on its
      own; PyTriton keeps the whole log, however long the server runs) and the log is printed to
      stdout only with ``verbose`` (PyTriton prints every line).
    * When ``tritonserver`` exits on its own, PyTriton stops and cleans up from the thread that
      noticed it, racing this process's own exit; here the exit is only recorded and
      :func:`serve`'s thread stops it.
    * The model is written to ``workspace``'s model store and loaded from there (see the module
      docstring); the shared-memory prefix is recorded for the clean-up.
    """
    from pytriton.triton import Triton, TritonLifecyclePolicy

    class _Triton(Triton):
        def __init__(self) -> None:
            self.log: list[str] = []  # the end of Triton's log, as chunks of what its pipe delivered
            self.log_size = 0
            self.exit_status: int | None = None
            self.exited = False
            self.shm_prefix = ""
            super().__init__(
                config=config,
                workspace=workspace,
                triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True),
            )

        def _shm_prefix(self) -> str:
            self.shm_prefix = super()._shm_prefix()
            return self.shm_prefix

        def _initialize_server(self) -> None:
            super()._initialize_server()
            self._triton_server._record_logs = self._record  # bound when the process starts

        def _record(self, chunk: bytes | str) -> None:
            text = chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk
            self.log.append(text)
            self.log_size += len(text)
            if self.log_size > 2 * LOG_KEPT_CHARS:  # a long-running server's log is not kept whole
                self.log = ["".join(self.log)[-LOG_KEPT_CHARS:]]
                self.log_size = LOG_KEPT_CHARS
            if verbose:
                sys.stdout.write(text)
                sys.stdout.flush()

        def _on_tritonserver_exit(self, success: bool = False, exit_code: int | None = None, *_: Any) -> None:
            self.exit_status, self.exited = exit_code, True

        def log_tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
            return [ln.rstrip() for ln in "".join(self.log).splitlines()[-n:]]

        def ended(self) -> TritonExited:
            """What ended the server, once :meth:`is_alive` says it has ended: ``tritonserver``
            (its exit status comes from the thread that waits for it, a moment after the process
            is gone) or, with the server still up, the model's backend."""
            server_down = not self._is_alive_impl()
            deadline = time.monotonic() + 5
            while server_down and not self.exited and time.monotonic() < deadline:
                time.sleep(0.05)
            return TritonExited(self.exit_status, self.log_tail(), server=server_down)

    return _Triton()


def local_address(host: str) -> str:
    """An address this machine reaches ``host``'s endpoints at (a wildcard bind means loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def wait_model_ready(triton: Any, url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until ``url`` (the model's KServe ``/v2/models/<name>/ready``) answers 200.

    Triton's own ``/v2/health/ready`` says 200 before PyTriton has loaded the model (it starts
    Triton with an empty repository), and PyTriton's wait for the model only logs a warning when
    it runs out; the model's endpoint is the one that means requests will be answered.
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if not triton.is_alive():
            raise triton.ended()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise EngineError(
                f"model '{MODEL_NAME}' not ready after {timeout_s:.0f} s ({url}); --verbose shows Triton's log"
            )
        time.sleep(0.2)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """The live processes below ``pid`` (zombies excluded: they have exited)."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            if table[c][1] != "Z":
                out.add(c)
    return out


def become_subreaper() -> None:
    """Make the processes Triton starts come back to this one when their parent dies (Linux),
    instead of to init, where nothing would know they belong to this server."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def end_leftovers(before: set[int], grace_s: float = LEFTOVER_GRACE_S) -> set[int]:
    """End the processes below this one that were not there before the server started (``before``),
    once they have had ``grace_s`` to exit on their own; returns those still alive at the end.

    The top ones (backend stubs orphaned by a ``tritonserver`` that died, or a ``tritonserver``
    PyTriton could not stop) are killed first, so that their own children (multiprocessing's
    resource tracker, which unlinks the stub's shared memory) can still exit by themselves; then
    whatever remains. A stub ignores SIGTERM: SIGKILL is the signal that ends it.
    """
    me = os.getpid()

    def left_after(wait_s: float) -> tuple[set[int], dict[int, tuple[int, str]]]:
        deadline = time.monotonic() + wait_s
        while True:
            table = _processes()
            left = descendants(me, table) - before
            if not left or time.monotonic() >= deadline:
                return left, table
            time.sleep(0.1)

    left, table = left_after(grace_s)
    for everything in (False, True):
        if not left:
            break
        for p in left:
            if everything or table[p][0] == me:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        left, table = left_after(grace_s)
    return left


def python_envs() -> set[Path]:
    """The ``/tmp/python_env_XXXXXX`` folders of every Triton Python backend on this machine."""
    return set(Path(PYTHON_ENV_DIR).glob("python_env_*"))


def remove_shm(prefix: str) -> None:
    """Unlink the POSIX shared memory named ``prefix*`` (the Python backend's region for this server,
    which a stub that was killed cannot unlink)."""
    shm = Path("/dev/shm")
    if not prefix or not shm.is_dir():
        return
    for f in shm.glob(f"{prefix}*"):
        try:
            f.unlink()
        except OSError:
            pass


WORKSPACE_PREFIX = "rn50_serve"  # rn50_serve-<pid>@<host> in PyTriton's home (~/.cache/pytriton)


def workspace_name(pid: int, host: str) -> str:
    """``rn50_serve-<pid>@<host>``: one per process (a host name holds no ``@``, a pid no ``-``)."""
    return f"{WORKSPACE_PREFIX}-{pid}@{host}"


def new_workspace(home: Path) -> tuple[Path, Any]:
    """(folder to remove at the end, PyTriton ``Workspace``) for this server, in ``home``. The folder
    is named after this process and host (:func:`workspace_name`), so that a later start can tell
    the workspaces left by a ``serve.triton`` that was killed outright (SIGKILL, out of memory:
    about 22 MB each, Triton's copy and the model) from those of servers still running
    (:func:`remove_stale_workspaces`). One of the same name is a dead process's whose pid this
    one now has: it is replaced."""
    import shutil
    import socket

    from pytriton.utils.workspace import Workspace

    own = home / workspace_name(os.getpid(), socket.gethostname())
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir(parents=True)
    return own, Workspace(own / "workspace")


def remove_stale_workspaces(home: Path) -> list[Path]:
    """Remove the workspaces in ``home`` of this host's ``serve.triton`` processes that no longer
    exist; returns them. Another host's (a shared home folder) and a live process's stay."""
    import shutil
    import socket

    host = socket.gethostname()
    stale = []
    for d in home.glob(f"{WORKSPACE_PREFIX}-*@*"):
        pid_text, _, owner = d.name[len(WORKSPACE_PREFIX) + 1 :].partition("@")
        if owner != host or not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive (or another user's: PermissionError below)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        stale.append(d)
    return stale


def bind(triton: Any, classifier: Any, version: int, max_batch: int, queue_delay_us: int) -> None:
    """Declare model ``rn50``: BYTES ``image`` ([-1, 1]: one encoded image per row), outputs
    ``topk`` / ``classes`` / ``probs`` ([-1, k]) and ``error`` ([-1, 1]), dynamic batching up to
    ``max_batch`` rows with at most ``queue_delay_us`` of waiting for a fuller batch."""
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    from .model import INPUT

    k = classifier.k
    triton.bind(
        model_name=MODEL_NAME,
        model_version=version,
        infer_func=classifier,
        inputs=[Tensor(name=INPUT, dtype=np.bytes_, shape=(1,))],
        outputs=[
            Tensor(name="topk", dtype=np.int32, shape=(k,)),
            Tensor(name="classes", dtype=np.bytes_, shape=(k,)),
            Tensor(name="probs", dtype=np.float32, shape=(k,)),
            Tensor(name="error", dtype=np.bytes_, shape=(1,)),
        ],
        config=ModelConfig(
            max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)
        ),
        strict=True,
    )


def serve(
    classifier: Any,
    *,
    version: int,
    max_batch: int,
    queue_delay_us: int,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    verbose: bool = False,
    on_ready: Any = None,
) -> None:
    """Start Triton with the classifier, call ``on_ready`` once model ``rn50`` answers on its
    ``/v2/models/rn50/ready``, and block until SIGINT or SIGTERM, then stop it. Raises
    :class:`TritonExited` when ``tritonserver`` exits on its own. On every way out, the server's
    processes (its backend stubs included), its workspace and its shared memory are gone before
    this returns or raises; so is its backend's ``/tmp/python_env_XXXXXX`` once the model was
    ready (it is known as the one such folder that appeared meanwhile: with another server
    starting at the same time, or a crash while the model loads, it may stay, empty)."""
    import logging
    import shutil

    import pytriton.server.triton_server as triton_server
    from pytriton.constants import PYTRITON_HOME

    env = stub_env()
    # PyTriton runs the stub in the environment this function names (by default this process's).
    triton_server.get_triton_python_backend_python_env = lambda: env
    triton_env()
    if not verbose:  # PyTriton's own warnings repeat what this command reports in its own words
        logging.getLogger("pytriton").setLevel(logging.ERROR)
    before = descendants(os.getpid())
    become_subreaper()

    def to_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, to_interrupt)
    triton, own_folder = None, None
    envs_before, own_env = python_envs(), None
    try:
        try:
            remove_stale_workspaces(PYTRITON_HOME)
            own_folder, workspace = new_workspace(PYTRITON_HOME)  # PyTriton's home (~/.cache/pytriton)
        except OSError as e:
            raise EngineError(
                f"cannot make the Triton workspace in {PYTRITON_HOME} ({e.strerror or e}); "
                "set PYTRITON_HOME to a writable folder"
            ) from e
        triton = make_triton(triton_config(host, http_port, grpc_port, metrics_port, verbose), workspace, verbose)
        triton.run()  # starts tritonserver and waits for it; stopped in `finally`, on every way out
        bind(triton, classifier, version, max_batch, queue_delay_us)  # loads the model
        wait_model_ready(triton, f"http://{local_address(host)}:{http_port}/v2/models/{MODEL_NAME}/ready")
        # This server's backend made its folder in this window and keeps it while it runs: when
        # one folder alone is new, it is that one (with several, another server's could be among them).
        new_envs = python_envs() - envs_before
        own_env = new_envs.pop() if len(new_envs) == 1 else None
        if on_ready is not None:
            on_ready()
        while triton.is_alive():
            time.sleep(0.5)
        raise triton.ended()
    except KeyboardInterrupt:
        pass
    except (EngineError, TritonExited):
        raise
    except Exception as e:  # PyTriton raises several types (timeouts, validation, the server exiting)
        if triton is not None and triton.exited:  # PyTriton's error is about the server exiting
            raise triton.ended() from e
        raise EngineError(f"Triton Inference Server failed ({type(e).__name__}: {e}); --verbose shows its log") from e
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        try:
            if triton is not None:
                triton.stop()  # no-op when already stopped
        finally:
            end_leftovers(before)
            if own_env is not None:  # left by a tritonserver that did not shut down cleanly
                try:
                    own_env.rmdir()  # empty, unless something unexpected is inside: then it stays
                except OSError:
                    pass
            if triton is not None:
                remove_shm(triton.shm_prefix)
            if own_folder is not None:
                shutil.rmtree(own_folder, ignore_errors=True)
            signal.signal(signal.SIGTERM, previous)


def check_ports(host: str, ports: dict[str, int]) -> None:
    """EngineError naming the flag of a port that cannot be bound on ``host`` (in use, not allowed,
    or given to two endpoints), before Triton is started: Triton itself would only time out.
    The range (1-65535) is checked with the other flags (``serve.triton.FLAG_RANGES``).

    The probe sets SO_REUSEADDR as Triton's own listeners do: a port whose last connections are
    in TIME_WAIT (a server just stopped with clients connected) is free for Triton, and a port
    another socket listens on is refused all the same."""
    import socket

    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise EngineError(f"{flag} {port}: {seen[port]} is {port} too; the three endpoints need three ports")
        seen[port] = flag
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise EngineError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e})") from e
