"""Engines behind one small interface, picked by file suffix.

``.plan`` -> TensorRT runtime, ``.onnx`` -> ONNX Runtime, ``.pt2`` -> AOTInductor, ``.pt`` -> the
training checkpoint in eager PyTorch (the unexported reference). Each backend has

* ``name``        - "tensorrt", "onnxruntime", "aoti" or "pytorch"
* ``provider``    - what actually runs it (e.g. ``CPUExecutionProvider``, ``cuda:0``)
* ``device``      - "cpu" or "cuda": where ``run`` wants its input
* ``input_dtype`` - "float32" or "float16"
* ``max_batch``   - the largest batch the engine takes
* ``max_batch_declared`` - True when ``max_batch`` comes from the engine or its manifest, False
  when neither bounds the batch and it is the :data:`DEFAULT_MAX_BATCH` cap
* ``num_classes`` - the engine's output width, or None when it cannot be read without running it
* ``input_shape`` - the ``(channels, height, width)`` of one image the engine takes, a dimension
  None where the engine leaves it dynamic; None altogether when the engine does not say
* ``run(batch)``  - logits as float32 numpy ``(N, classes)``; ``batch`` is float32 NCHW numpy
  on the CPU or a torch CUDA tensor (DALI's GPU output) on the GPU.

Loading checks the manifest beside the engine (:func:`load_engine`): kind against suffix, the
file against the sha256 the manifest records for it (so an artifact copied over another, or one
renamed into place without its manifest, is not served under the other's manifest), the
manifest's image size against the engine's input (the export makes only the batch dynamic, so an
engine takes one height and width), class count against the engine's output, and for TensorRT the
GPU / TensorRT version the plan was built for. Every failure is an
:class:`rn50.errors.EngineError` or ``ManifestError`` whose message names the file; all of them
come before any image is decoded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rn50.errors import EngineError, ManifestError
from rn50.manifest import preprocessing_of, read_manifest

SUFFIXES = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnxruntime", ".pt2": "aoti", ".pt": "pytorch"}
# the manifest "kind" that export (and train, for a checkpoint) writes for each suffix
KINDS = {".plan": "tensorrt", ".engine": "tensorrt", ".onnx": "onnx", ".pt2": "aoti", ".pt": "checkpoint"}
# Without a fixed batch in the engine or a max_batch in its manifest, this is the cap.
DEFAULT_MAX_BATCH = 1024


def manifest_max_batch(manifest: dict[str, Any]) -> tuple[int, bool]:
    """``(max_batch, declared)`` from a manifest's ``max_batch``, else the default cap."""
    m = manifest.get("max_batch")
    return (int(m), True) if m else (DEFAULT_MAX_BATCH, False)


class Backend(Protocol):
    name: str
    provider: str
    device: str
    input_dtype: str
    max_batch: int
    max_batch_declared: bool
    num_classes: int | None
    input_shape: tuple[int | None, ...] | None

    def run(self, batch: Any) -> np.ndarray: ...


def _suffix(path: Path) -> str:
    s = path.suffix.lower()
    if s not in SUFFIXES:
        raise EngineError(
            f"{path}: unknown engine type '{s or '(no suffix)'}' (expected {', '.join(sorted(SUFFIXES))})"
        )
    return s


def _refuse_pt_options(path: Path, suffix: str, precision: str | None, compile: bool) -> None:
    """EngineError when ``.pt`` options are asked of another engine (its export fixed them)."""
    if (precision is not None or compile) and SUFFIXES[suffix] != "pytorch":
        raise EngineError(
            f"{path}: precision and torch.compile options apply to .pt checkpoints only; "
            f"a {suffix} engine runs as exported"
        )


def load_backend(
    path: str | os.PathLike[str],
    manifest: dict[str, Any] | None = None,
    prefer_gpu: bool = True,
    suffix: str | None = None,
    *,
    pt_precision: str | None = None,
    pt_compile: bool = False,
    pt_batch: int | None = None,
) -> Backend:
    """Open ``path`` with the backend its suffix names (no manifest checks; see load_engine).

    ``suffix`` names the engine type where the path's own suffix does not (a file that is still
    being written under a temporary name, as export checks it before renaming it into place).

    ``pt_precision`` (fp32 when None, or fp16), ``pt_compile`` (torch.compile) and ``pt_batch``
    (the batch the compiled model is fixed to) apply to a ``.pt`` checkpoint only
    (:class:`rn50.backends.pytorch.TorchBackend`); every other engine's precision and compilation
    were fixed by its export, and asking them of one is an EngineError."""
    path = Path(path)
    s = _suffix(Path(f"engine{suffix}") if suffix else path)
    _refuse_pt_options(path, s, pt_precision, pt_compile)
    if not path.exists():
        raise EngineError(f"{path}: engine not found")
    if not path.is_file():
        raise EngineError(f"{path}: not a file")
    manifest = manifest or {}
    if SUFFIXES[s] == "onnxruntime":
        from .onnxruntime import OrtBackend

        return OrtBackend(path, manifest, prefer_gpu=prefer_gpu)
    if SUFFIXES[s] == "aoti":
        from .aoti import AotiBackend

        return AotiBackend(path, manifest, prefer_gpu=prefer_gpu)
    if SUFFIXES[s] == "pytorch":
        from .pytorch import TorchBackend

        return TorchBackend(
            path,
            manifest,
            prefer_gpu=prefer_gpu,
            precision=pt_precision or "fp32",
            compile=pt_compile,
            batch_size=pt_batch,
        )
    from .tensorrt import TrtBackend

    return TrtBackend(path, manifest)


def load_engine(
    path: str | os.PathLike[str],
    prefer_gpu: bool = True,
    *,
    pt_precision: str | None = None,
    pt_compile: bool = False,
    pt_batch: int | None = None,
) -> tuple[Backend, dict[str, Any]]:
    """Check the engine and its manifest, open it; ``(backend, manifest)``.

    ``pt_*``: the options of a ``.pt`` engine (:func:`load_backend`); refused for others before
    anything is read. Raises EngineError / ManifestError with a message for the terminal.
    """
    path = Path(path)
    s = _suffix(path)
    _refuse_pt_options(path, s, pt_precision, pt_compile)
    if not path.exists():
        raise EngineError(f"{path}: engine not found")
    m = read_manifest(path)
    kind = str(m.get("kind", ""))
    if kind != KINDS[s]:
        raise ManifestError(
            f"{path}: the manifest beside it describes a '{kind}' artifact, not a {s} engine "
            f"(expected kind {KINDS[s]!r}); "
            f"is {path.name}{'.manifest.json'} the right manifest?"
        )
    size = preprocessing_of(m).image_size
    if "image_size" in m and m["image_size"] != size:
        raise ManifestError(
            f"{path}: its manifest is inconsistent: image_size {m['image_size']} but its preprocessing crops {size} px"
        )
    backend = load_backend(
        path, m, prefer_gpu=prefer_gpu, pt_precision=pt_precision, pt_compile=pt_compile, pt_batch=pt_batch
    )
    embedded = getattr(backend, "manifest", None)  # a checkpoint's own, inside the .pt
    if embedded is not None:
        # the file beside a checkpoint is a copy of the one inside it; edited, it would rename the
        # outputs or change the preprocessing of the weights, which export and serve.validate
        # read from inside: the two must agree
        for key in ("classes", "preprocessing"):
            if m.get(key) != embedded.get(key):
                raise ManifestError(
                    f"{path}: the manifest beside it ({path.name}.manifest.json) and the one inside the "
                    f"checkpoint differ in {key!r}; restore the file beside it from the checkpoint's "
                    "(or re-save the checkpoint)"
                )
    check_input_shape(path, backend.input_shape, size)
    n = backend.num_classes
    if n is not None and n != len(m["classes"]):
        raise ManifestError(f"{path}: the engine outputs {n} classes but its manifest lists {len(m['classes'])}")
    failed = failed_export_checks(m)
    if failed:  # export wrote it anyway (--force): a debugging artifact, not one to deploy unnoticed
        print(f"warning: {path}: {failed}", file=sys.stderr)
    return backend, m


def failed_export_checks(manifest: dict[str, Any]) -> str | None:
    """What the manifest says export found wrong with the engine it still wrote (``--force``):
    the parity check against PyTorch, the INT8 accuracy gate; None when both passed or were not run."""
    int8 = manifest.get("int8")
    checks = [
        ("parity check", manifest.get("parity")),
        ("INT8 accuracy gate", int8.get("gate") if isinstance(int8, dict) else None),
    ]
    failed = [
        f"the {name} ({rec.get('problem') or 'failed'})"
        for name, rec in checks
        if isinstance(rec, dict) and rec.get("passed") is False
    ]
    if not failed:
        return None
    return f"exported although it failed {' and '.join(failed)} (written with --force); serve.validate measures it"


def _chw(shape: tuple[int | None, ...]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def check_input_shape(path: Path, engine_shape: tuple[int | None, ...] | None, image_size: int) -> None:
    """ManifestError unless the engine takes the 3 x image_size x image_size images the manifest's
    preprocessing makes (dimensions the engine leaves dynamic, or does not report, pass)."""
    if engine_shape is None:
        return
    want = (3, image_size, image_size)
    if len(engine_shape) != 3 or any(g is not None and g != w for g, w in zip(engine_shape, want)):
        raise ManifestError(
            f"{path}: the engine takes {_chw(engine_shape)} (channels x height x width) images but its manifest "
            f"({path.name}.manifest.json) says image_size {image_size}, i.e. {_chw(want)}: the manifest does not "
            f"describe this engine (use the manifest written with it, or re-export at {image_size} px)"
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best classes of each row, best first (ties in class order), and their softmax
    probabilities: ``(indices int (N, k), probs float32 (N, k))``."""
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(softmax(logits), idx, axis=1)
