"""The ImageNet folder layout: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``.

Class names are the folder names; their sorted order gives the label indices (the same rule as
torchvision's ``ImageFolder`` and DALI's ``readers.file``), and the list travels in every
manifest so later stages never re-derive it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # decompression-bomb guard: larger images are refused, not decoded


@dataclass
class Split:
    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_split(root: str | os.PathLike[str], classes: list[str] | None = None) -> Split:
    """Index one split folder. With ``classes`` given, the folder's classes must be the same."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (expected <data>/train/<class>/*.jpg and <data>/val/<class>/*.jpg)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classes is not None and found != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(f"{root}: class folders differ from the training classes "
                        f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})")
    files: list[str] = []
    labels: list[int] = []
    for idx, name in enumerate(found):
        for dirpath, _, names in os.walk(root / name):
            for n in sorted(names):
                if is_image_name(n):
                    files.append(os.path.join(dirpath, n))
                    labels.append(idx)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) under the class folders")
    return Split(root, found, files, labels)


def load_dataset(data: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Index ``data/train`` and ``data/val``; their classes must agree."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found (run `make data`, or point --data at an ImageNet-layout folder)")
    train = scan_split(data / "train")
    val = scan_split(data / "val", classes=train.classes)
    return train, val


def iter_inputs(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted) into image paths, in a stable order.

    Files given explicitly are yielded whatever their suffix, so a bad file the user named is
    reported rather than silently skipped; inside folders only image suffixes are taken.
    """
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, names in os.walk(p):
                dirnames.sort()
                for n in sorted(names):
                    if is_image_name(n):
                        yield Path(dirpath) / n
        else:
            yield p


def check_header(data: bytes, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if ``data`` starts like a decodable image of acceptable size, else the cause.

    Only the header is parsed (PIL's lazy open): no pixel data is decoded, so it is cheap enough
    to run on every file before DALI sees it. DALI's decoders can crash the process on some
    non-image inputs instead of raising, which is why nothing reaches them unchecked.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt = im.format
    except Image.DecompressionBombError as e:
        return f"image too large: {e} (limit {max_pixels:,} pixels)"
    except UnidentifiedImageError:
        return "not an image (unrecognised file format)"
    except Exception as e:
        return f"unreadable image header ({type(e).__name__}: {e})"
    if w * h > max_pixels:
        return (f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                f"pixels (possible decompression bomb)")
    if w < 1 or h < 1:
        return f"bad image size {w}x{h} in the {fmt} header"
    return None


def check_files(files: list[str], max_report: int = 10, progress: bool = True) -> None:
    """Header-check every file; DataError naming the bad ones (up to ``max_report``)."""
    from tqdm import tqdm

    bad: list[str] = []
    it = tqdm(files, desc="checking image headers", unit="file", mininterval=2.0, leave=False,
              disable=not progress or len(files) < 20000)
    for f in it:
        try:
            with open(f, "rb") as fh:
                head = fh.read(1 << 16)
        except OSError as e:
            bad.append(f"{f}: cannot read ({e.strerror or e})")
            continue
        cause = check_header(head)
        if cause:
            bad.append(f"{f}: {cause}")
    if bad:
        more = f" (and {len(bad) - max_report} more)" if len(bad) > max_report else ""
        raise DataError(f"{len(bad)} bad image file(s): " + "; ".join(bad[:max_report]) + more)
