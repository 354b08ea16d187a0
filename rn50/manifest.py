"""The manifest: a JSON file beside every artifact (``<artifact>.manifest.json``).

It says what the artifact came from (path and sha256 of the source), which file it describes
(``artifact``: that file's own sha256), how inputs are preprocessed (the
:class:`~rn50.preprocess.Preprocessing` contract), the class names, the precision, the measured
accuracy, the library versions and, for engines, the target GPU. Each stage reads the previous
stage's manifest instead of asking the user again.

A manifest and its artifact are two files, renamed into place one after the other, and either
can be copied over on its own; the ``artifact`` record is what lets a reader
(:func:`read_manifest`) tell that the pair no longer belongs together. Writers put the manifest
in place first and the artifact second (:func:`new_manifest` hashes the artifact under its
temporary name), so a writer killed between the two leaves a new manifest beside the old file,
which that check refuses, rather than a new file under an old manifest, which an older manifest
without the record could not reveal.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as _md
import json
import os
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import write_json
from .errors import ManifestError
from .preprocess import Preprocessing

SUFFIX = ".manifest.json"
SCHEMA = 1
REQUIRED = ("schema", "kind", "arch", "classes", "preprocessing", "precision")
_DISTS = (
    "torch",
    "torchvision",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "onnxscript",
    "tensorrt",
    "polygraphy",
    "numpy",
)


def manifest_path(artifact: str | os.PathLike[str]) -> Path:
    return Path(str(artifact) + SUFFIX)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rn50": __version__}
    for d in _DISTS:
        try:
            out[d] = _md.version(d)
        except _md.PackageNotFoundError:
            pass
    return out


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def artifact_record(file: str | os.PathLike[str]) -> dict[str, str]:
    """The manifest's ``artifact`` entry for ``file``: its sha256 (the name is left out: the
    manifest sits beside the file and an artifact may be renamed together with it)."""
    return {"sha256": sha256_file(file)}


def new_manifest(
    kind: str,
    *,
    classes: list[str],
    preprocessing: Preprocessing,
    precision: str,
    source: str | os.PathLike[str] | None = None,
    artifact: str | os.PathLike[str] | None = None,
    accuracy: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A fresh manifest. ``source`` (a file) is recorded with its sha256; so is ``artifact``, the
    file the manifest describes, which may still be under the temporary name it is written to
    before being renamed into place (see the module's docstring for the order)."""
    from .model import ARCH

    m: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "arch": ARCH,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(classes),
        "num_classes": len(classes),
        "image_size": preprocessing.image_size,
        "preprocessing": preprocessing.to_dict(),
        "precision": precision,
        "accuracy": accuracy or {},
        "versions": library_versions(),
    }
    if source is not None:
        m["source"] = {"path": str(source), "sha256": sha256_file(source)}
    if artifact is not None:
        m["artifact"] = artifact_record(artifact)
    m.update(extra)
    return m


def validate(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ManifestError(f"{where}: manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ManifestError(f"{where}: manifest lacks {', '.join(missing)}")
    if m["schema"] != SCHEMA or isinstance(m["schema"], bool):
        raise ManifestError(f"{where}: manifest schema {m['schema']!r} is not {SCHEMA}")
    classes = m["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise ManifestError(f"{where}: manifest 'classes' must list at least two class names")
    # class names are printed, written to label files and compared with folder names
    bad = [c for c in classes if not isinstance(c, str) or not c]
    if bad or len(set(classes)) != len(classes):
        what = f"holds {bad[0]!r}" if bad else "repeats a name"
        raise ManifestError(f"{where}: manifest 'classes' {what}: it must list distinct, non-empty class names")
    try:
        Preprocessing.from_dict(m["preprocessing"])
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: bad preprocessing in manifest: {e}") from e
    # the optional numbers that loaders turn into sizes and versions, and the record that ties the
    # manifest to its file (a malformed one would otherwise switch that check off)
    for key in ("image_size", "max_batch", "model_version"):
        v = m.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ManifestError(f"{where}: manifest {key!r} must be a whole number, at least 1, not {v!r}")
    rec = m.get("artifact")
    if rec is not None:
        sha = rec.get("sha256") if isinstance(rec, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(
                f"{where}: manifest 'artifact' must be {{\"sha256\": <64 hex digits>}} (the file it describes), "
                f"not {rec!r}"
            )
    return m


def check_artifact(artifact: str | os.PathLike[str], m: dict[str, Any]) -> None:
    """ManifestError unless ``artifact`` is the file its manifest ``m`` was written for (the
    ``artifact`` record's sha256). Manifests written before they carried the record pass: there
    is nothing to compare. Hashing reads the file once, which a loader pays once per process."""
    rec = m.get("artifact")
    if rec is None:
        return  # written before manifests had the record (validate refuses a malformed one)
    want, got = str(rec["sha256"]), sha256_file(artifact)
    if got != want:
        raise ManifestError(
            f"{artifact} does not match its manifest: the manifest describes a file with sha256 {want[:12]}…, "
            f"this file has {got[:12]}…; re-export it or restore the matching manifest"
        )


def write_manifest(artifact: str | os.PathLike[str], m: dict[str, Any]) -> Path:
    validate(m, str(artifact))
    p = manifest_path(artifact)
    write_json(p, m)
    return p


def read_manifest(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the manifest beside ``artifact``, and that it was written for this very file
    (:func:`check_artifact`); ManifestError says what is wrong."""
    p = manifest_path(artifact)
    if not p.is_file():
        raise ManifestError(
            f"{p}: manifest not found beside {artifact} (every artifact this project writes has one; "
            f"was {Path(artifact).name} produced by "
            f"`python -m {'train' if Path(artifact).suffix.lower() == '.pt' else 'export'}`?)"
        )
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: unreadable manifest ({e})") from e
    validate(m, str(p))
    check_artifact(artifact, m)
    return m


def preprocessing_of(m: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(m["preprocessing"])
