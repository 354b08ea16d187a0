"""Convert Debian's ``dataset-fashion-mnist`` into the ImageNet folder layout.

    python -m rn50.fashion_mnist --out data/fashion-mnist

writes ``OUT/train/<class>/<index>.jpg`` (60,000 images) and ``OUT/val/<class>/<index>.jpg``
(the 10,000 test images) as 28x28 grayscale JPEGs, so the rest of the pipeline sees exactly what
it would see on ImageNet: class folders, encoded files, grayscale images decoded to RGB.

Idempotent: a finished conversion leaves ``OUT/.complete.json``; running again with the same
arguments does nothing. The conversion is written to a temporary folder and renamed at the end,
so an interrupted run leaves nothing half-done under ``OUT``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from .errors import DataError

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MARKER = ".complete.json"


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(data) < 8:
        raise DataError(f"{path}: too short for an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: {arr.size} bytes of data for shape {dims}")
    return arr.reshape(dims)


def source_missing_message(source: Path) -> str:
    return (
        f"{source}: Fashion-MNIST not found. Install Debian's package: "
        f"`sudo apt-get install -y {DEBIAN_PACKAGE}` "
        f"(as root: `apt-get update && apt-get install -y {DEBIAN_PACKAGE}`), "
        f"or pass --source to a folder holding {', '.join(FILES['train'] + FILES['val'])}"
    )


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    if not (source / images_name).is_file():
        raise DataError(source_missing_message(source))
    images = _read_idx(source / images_name)
    labels = _read_idx(source / labels_name)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{source}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels


def select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices to keep: all, or the first ``per_class`` of each class (deterministic)."""
    if per_class is None:
        return np.arange(labels.shape[0])
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def convert(
    out: Path,
    source: Path = DEFAULT_SOURCE,
    per_class_train: int | None = None,
    per_class_val: int | None = None,
    quality: int = 95,
    progress: bool = True,
) -> Path:
    from PIL import Image

    out = Path(out)
    spec = {
        "source": str(source),
        "per_class_train": per_class_train,
        "per_class_val": per_class_val,
        "quality": quality,
        "classes": CLASSES,
    }
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text())["spec"] == spec:
                return out
        except (ValueError, KeyError):
            pass
    splits = {s: load_split(source, s) for s in FILES}
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for split, (images, labels) in splits.items():
        idx = select(labels, per_class_train if split == "train" else per_class_val)
        for c in CLASSES:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        it = idx if not (progress and tqdm) else tqdm(idx, desc=f"fashion-mnist {split}", unit="img", file=sys.stderr)
        for i in it:
            Image.fromarray(images[i], mode="L").save(
                tmp / split / CLASSES[labels[i]] / f"{i:05d}.jpg", quality=quality
            )
        counts[split] = int(idx.size)
    (tmp / MARKER).write_text(json.dumps({"spec": spec, "counts": counts}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rn50.fashion_mnist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("data/fashion-mnist"), help="output folder (default: %(default)s)")
    ap.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="folder of the IDX .gz files (default: %(default)s)"
    )
    ap.add_argument(
        "--per-class-train", type=int, default=None, help="keep only the first N training images of each class"
    )
    ap.add_argument(
        "--per-class-val", type=int, default=None, help="keep only the first N validation images of each class"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        out = convert(a.out, a.source, a.per_class_train, a.per_class_val, progress=not a.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = json.loads((out / MARKER).read_text())["counts"]
    print(f"{out}: {counts['train']} train / {counts['val']} val images in {len(CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
