"""Checkpoints: one ``torch.save`` dict, written atomically, loadable with ``weights_only=True``.

Layout::

    {"format": "rn50-checkpoint", "version": 1,
     "model": <state_dict without DDP/compile prefixes>,
     "manifest": <the manifest file beside it, less its "artifact" record (the checkpoint
                  file's own sha256, which the file cannot hold)>,
     ... whatever the trainer adds to resume (optimizer, scaler, epoch, rng) ...}

Everything inside is tensors, numbers, strings, lists, tuples and dicts, so loading never
unpickles code.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path
from .errors import CheckpointError, first_line
from .manifest import artifact_record, validate, write_manifest
from .model import build_model, num_classes_of

FORMAT = "rn50-checkpoint"
VERSION = 1


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre) :]
        k = k.replace("._orig_mod.", ".")
        out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


def weights_sha256(state_dict: dict[str, Any]) -> str:
    """sha256 of a model's weights: every tensor's name, dtype, shape and values, in name order,
    whatever else the file holds. A ``last.pt`` (weights with the training state) and a
    ``best.pt`` of the same epoch differ as files and share this."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(clean_state_dict(state_dict).items()):
        if not isinstance(v, torch.Tensor):
            continue
        t = v.contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str], model_state: dict[str, torch.Tensor], manifest: dict[str, Any], **extra: Any
) -> Path:
    """Write ``path`` and ``path.manifest.json`` atomically; return ``path``.

    The manifest file records the checkpoint file's sha256 (``artifact``), so that serving a
    ``.pt`` whose file was replaced behind its manifest is refused. It goes into place before the
    checkpoint (rn50.manifest's order), so a process killed between the two renames leaves a
    pair that check refuses; hashing reads the file once per save."""
    path = Path(path)
    obj = {"format": FORMAT, "version": VERSION, "model": clean_state_dict(model_state), "manifest": manifest, **extra}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        write_manifest(path, {**manifest, "artifact": artifact_record(tmp)})
    return path


def torch_load(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only`` (tensors and plain data; no code from the file runs). A file
    torch cannot read raises CheckpointError ``PATH: not a readable WHAT (truncated or corrupt?): ...``;
    ``pickle.UnpicklingError`` (data the weights-only unpickler refuses) is left to the caller, which
    knows what such data means for its kind of file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    # arbitrary bytes reach the unpickler's own lookups too (KeyError for an unknown memo entry,
    # IndexError, TypeError, struct.error): every one of them means the same for the person at the terminal
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        KeyError,
        IndexError,
        TypeError,
        struct.error,
    ) as e:
        raise CheckpointError(
            f"{path}: not a readable {what} (truncated or corrupt?): {type(e).__name__}: {first_line(e)}"
        ) from e


# what a file given where weights belong is instead, by its name: torch.load's own error about
# such a file ("Unsupported operand 8", "invalid load key") says nothing of the mix-up
OTHER_ARTIFACTS = {
    ".onnx": "an ONNX model",
    ".plan": "a TensorRT engine",
    ".engine": "a TensorRT engine",
    ".pt2": "an AOTInductor package",
    ".json": "a JSON file",
    ".jsonl": "a JSON-lines file",
    ".md": "a text file",
    ".txt": "a text file",
    ".jpg": "an image",
    ".jpeg": "an image",
    ".png": "an image",
}


def not_weights(path: Path, what: str) -> str | None:
    """``PATH: is an ONNX model, not a WHAT ...`` when ``path``'s name says it is one of the other
    artifacts (:data:`OTHER_ARTIFACTS`), else None."""
    name = path.name.lower()
    kind = "a manifest" if name.endswith(".manifest.json") else OTHER_ARTIFACTS.get(path.suffix.lower())
    if kind is None:
        return None
    return f"{path}: is {kind}, not a {what} (give the .pt checkpoint or weights file it came from)"


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    other = not_weights(path, "checkpoint")
    if other:
        raise CheckpointError(other)
    try:
        obj = torch_load(path, "checkpoint", map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a torch.save file, or corrupt): {_unpickling_cause(e)}"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "model" not in obj:
        raise CheckpointError(f"{path}: not an rn50 checkpoint (no 'format': '{FORMAT}' with a 'model' state)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is not {VERSION}")
    try:
        validate(obj.get("manifest"), f"{path} (embedded manifest)")
    except Exception as e:
        raise CheckpointError(str(e)) from e
    return obj


def _unpickling_cause(e: pickle.UnpicklingError) -> str:
    """The unpickler's own reason, without torch's advice to retry with ``weights_only=False``: an
    rn50 checkpoint holds only tensors and plain data, so that advice never applies to one (and
    would run code from the file)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest or "unreadable pickle data"
    return lines[0] if lines and "weights_only" not in lines[0] else "unreadable pickle data"


def state_dict_mismatch(expected: dict[str, Any], got: dict[str, Any]) -> str | None:
    """What keeps ``got`` from loading where ``expected`` (a model's own state dict) is: the first
    missing or other-shaped tensor in the model's order, else the first unexpected one; None if
    it fits."""
    missing = [k for k in expected if k not in got]
    for k, v in expected.items():
        if k not in got:
            return f"tensor {k} is missing ({len(missing)} of the model's {len(expected)} are)"
        g = got[k]
        if not isinstance(g, torch.Tensor):
            return f"{k} is a {type(g).__name__}, not a tensor"
        if tuple(g.shape) != tuple(v.shape):
            return f"{k} has shape {tuple(g.shape)} but the model's is {tuple(v.shape)}"
    extra = [k for k in got if k not in expected]
    if extra:
        return f"unexpected tensor {extra[0]} ({len(extra)} in all)"
    return None


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network from a checkpoint; returns ``(model in eval mode, manifest)``."""
    obj = load_checkpoint(path, map_location)
    manifest = obj["manifest"]
    classes = manifest["classes"]
    try:
        n = num_classes_of(obj["model"])
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint has no fc.weight: not a ResNet50 classifier") from e
    if n != len(classes):
        raise CheckpointError(
            f"{path}: the checkpoint's classifier has {n} outputs but its manifest lists {len(classes)} classes"
        )
    model = build_model(n)
    why = state_dict_mismatch(model.state_dict(), obj["model"])
    if why is not None:
        raise CheckpointError(f"{path}: weights do not fit ResNet50 v1.5 with {n} classes: {why}")
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit ResNet50 v1.5 with {n} classes: {first_line(e)}") from e
    model.to(map_location).eval()
    return model, manifest
