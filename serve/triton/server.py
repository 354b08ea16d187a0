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
    """Start Triton with the classifier and block until SIGINT or SIGTERM, then stop it (the server
    and its stub processes exit before this returns)."""
    import pytriton.server.triton_server as triton_server
    from pytriton.triton import Triton

    env = stub_env()
    # PyTriton runs the stub in the environment this function names (by default this process's).
    triton_server.get_triton_python_backend_python_env = lambda: env
    triton_env()

    def to_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, to_interrupt)
    try:
        with Triton(config=triton_config(host, http_port, grpc_port, metrics_port, verbose)) as triton:
            bind(triton, classifier, version, max_batch, queue_delay_us)
            triton.run()
            if on_ready is not None:
                on_ready()
            while triton.is_alive():
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except EngineError:
        raise
    except Exception as e:  # PyTriton raises several types (timeouts, validation, the server exiting)
        raise EngineError(f"Triton Inference Server failed ({type(e).__name__}: {e}); --verbose shows its log") from e
    finally:
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
