"""The ImageNet folder layout: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``.

Class names are the folder names; their sorted order gives the label indices (the same rule as
torchvision's ``ImageFolder`` and DALI's ``readers.file``), and the list travels in every
manifest so later stages never re-derive it.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError

if TYPE_CHECKING:
    from .preprocess import Preprocessing

MAX_PIXELS = 100_000_000  # decompression-bomb guard: larger images are refused, not decoded
# What DALI's image decoder reads, by PIL's format names (PPM is PIL's name for the PNM family;
# MPO is a multi-picture JPEG whose first frame DALI decodes). Anything else (GIF, ICO, PSD, ...)
# is refused by name before DALI sees it.
DALI_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "BMP": "BMP",
    "TIFF": "TIFF",
    "WEBP": "WebP",
    "JPEG2000": "JPEG 2000",
    "PPM": "PNM",
}
# The file-name suffixes a folder scan takes (case-insensitive), for each of DALI_FORMATS: the
# suffixes PIL registers for those formats, less ``.pfm`` (PIL's float PNM, which DALI does not
# read). Files named explicitly are tried whatever their suffix; their content decides the format.
FORMAT_SUFFIXES = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".mpo",),
    "PNG": (".png", ".apng"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "JPEG2000": (".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx"),
    "PPM": (".pnm", ".pbm", ".pgm", ".ppm"),
}
assert FORMAT_SUFFIXES.keys() == DALI_FORMATS.keys()
IMG_EXTENSIONS = tuple(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)
_SUFFIX_FORMAT = {s: DALI_FORMATS[f] for f, suffixes in FORMAT_SUFFIXES.items() for s in suffixes}

# Formats whose DALI decoders (libtiff, OpenJPEG through OpenCV) report corrupt data only on
# stderr and still return pixels: PIL decodes these in full first, so a corrupt one is refused
# instead of classified. WebP and PNM are decoded too (their errors do raise in DALI today, but
# through the same libraries). JPEG is not: libjpeg's "Corrupt JPEG data" warnings are common in
# real data sets (ImageNet has such files) and a second CPU decode of every JPEG would halve
# serving throughput.
PIL_VERIFIED_FORMATS = frozenset({"TIFF", "JPEG2000", "WEBP", "PPM"})


@dataclass
class Split:
    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


def is_image_name(name: str) -> bool:
    """Whether a folder scan takes a file of this name: an image suffix (:data:`FORMAT_SUFFIXES`,
    any case) and not hidden (a name starting with ".", as macOS's ``._x.jpg`` metadata files)."""
    return not os.path.basename(name).startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def suffix_format(name: str) -> str | None:
    """The DALI format (a value of :data:`DALI_FORMATS`) that ``name``'s suffix names, or None."""
    return _SUFFIX_FORMAT.get(os.path.splitext(name)[1].lower())


def walk_images(
    folder: str | os.PathLike[str],
    *,
    unreadable: Callable[[str, OSError], None] | None = None,
    claimed: dict[tuple[int, int], str] | None = None,
) -> Iterator[str]:
    """The image files (:func:`is_image_name`) under ``folder``, recursively, in a stable order:
    each folder's files sorted, then its subfolders, sorted.

    Symlinked folders are followed, and each real folder is entered once: a second way to a folder
    already taken is not entered again, nor is a link to ``folder`` itself or to any folder above
    it (a loop, or a way out into a wider tree: in a class folder, ``up -> ..`` would give it every
    other class's images). Hidden names (starting with ".") are skipped at every level, files and
    folders alike, as class folders are.

    A folder that cannot be listed (no permission, an I/O error) is never skipped in silence: it
    is passed to ``unreadable(path, error)``, or, without that, raises DataError naming it.
    ``claimed`` (real folder -> the walked folder that entered it), shared between the walks of
    one split's classes: a folder another class's walk already entered raises DataError naming
    both, since its images would belong to two classes.
    """

    def failed(e: OSError) -> None:
        where = str(e.filename) if e.filename is not None else str(folder)
        if unreadable is not None:
            unreadable(where, e)
        else:
            raise DataError(f"{where}: cannot list this folder ({e.strerror or e}); its images would be left out")

    def enter(path: str, st: os.stat_result) -> bool:
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        if claimed is not None:
            owner = claimed.setdefault(key, str(folder))
            if owner != str(folder):
                raise DataError(
                    f"{path}: the same folder (through a link) as one under {owner}: its images would be in two classes"
                )
        return True

    seen: set[tuple[int, int]] = set()
    at = os.path.realpath(folder)
    while True:  # the folder's ancestors, real paths, up to the root
        up = os.path.dirname(at)
        if up == at:
            break
        at = up
        try:
            st = os.stat(at)
        except OSError:
            continue
        seen.add((st.st_dev, st.st_ino))
    try:
        st = os.stat(folder)
    except OSError as e:
        failed(e)
        return
    enter(str(folder), st)
    for dirpath, dirnames, names in os.walk(folder, onerror=failed, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:
                continue  # gone since it was listed, or a link loop
            if enter(os.path.join(dirpath, d), st):
                keep.append(d)
        dirnames[:] = keep  # os.walk enters only these, in this order
        for n in sorted(names):
            if is_image_name(n):
                yield os.path.join(dirpath, n)


def _form(name: str) -> str:
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, name):
            return form
    return "neither NFC nor NFD"


def _normalisation_hint(missing: list[str], extra: list[str]) -> str:
    """Where a training class and a folder here differ only in Unicode normalisation (the same
    letters, composed in one and decomposed in the other, e.g. names copied from macOS), which look
    identical when printed: say so, with the code points that differ. Labels go by name, so they
    are still other classes; the training classes are fixed (a checkpoint records them), so the
    folders here are the ones to rename."""
    here = {unicodedata.normalize("NFC", e): e for e in extra}
    pairs = [(m, here[unicodedata.normalize("NFC", m)]) for m in missing if unicodedata.normalize("NFC", m) in here]
    if not pairs:
        return ""
    m, e = pairs[0]
    more = f" (and {len(pairs) - 1} more such pairs)" if len(pairs) > 1 else ""
    return (
        f"; {m!r} differs only in Unicode normalisation: the training class is {_form(m)} ({ascii(m)}), "
        f"this folder's {_form(e)} ({ascii(e)}){more}, and labels go by the exact name: rename the class "
        f"folders here to the training classes' form"
    )


def scan_split(root: str | os.PathLike[str], classes: list[str] | None = None) -> Split:
    """Index one split folder. With ``classes`` given, the folder's classes must be the same."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "folder not found"
        raise DataError(f"{root}: {what} (expected a split folder: {root}/<class>/<image files>)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classes is not None and found != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        hint = _normalisation_hint(missing, extra)
        if {"train", "val"} <= set(found) and not set(found) & set(classes):
            hint = f"; {root} looks like a data root: give its split folder, {root / 'val'}"
        raise DataError(
            f"{root}: class folders differ from the training classes "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}){hint}"
        )
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    claimed: dict[tuple[int, int], str] = {}  # a folder two classes reach (a link) is an error
    for idx, name in enumerate(found):
        n_before = len(files)
        for f in walk_images(root / name, claimed=claimed):
            files.append(f)
            labels.append(idx)
        if len(files) == n_before:
            empty.append(str(root / name))
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) under the class folders")
    if empty:
        # a class without images would still get an output of the classifier and a manifest entry
        raise DataError(
            f"{empty[0]}: class folder has no image files ({', '.join(IMG_EXTENSIONS)})"
            + (f" (nor do {len(empty) - 1} more: {', '.join(empty[1:4])})" if len(empty) > 1 else "")
        )
    return Split(root, found, files, labels)


def load_dataset(data: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Index ``data/train`` and ``data/val``; their classes must agree."""
    data = Path(data)
    if not data.is_dir():
        what = "is a file, not a data folder" if data.exists() else "data folder not found"
        raise DataError(
            f"{data}: {what} (run `make data`, or point --data at an ImageNet-layout folder: "
            "<data>/train/<class>/<images> and <data>/val/<class>/<images>)"
        )
    train = scan_split(data / "train")
    if len(train.classes) < 2:  # a classifier of one class has nothing to learn (and ResNet50 needs 2 outputs)
        raise DataError(
            f"{data / 'train'}: only one class folder ({train.classes[0]}): a classifier needs at least two "
            "(expected <data>/train/<class>/ for each class)"
        )
    val = scan_split(data / "val", classes=train.classes)
    return train, val


def iter_inputs(
    inputs: Iterable[str | os.PathLike[str]], unreadable: Callable[[str, OSError], None] | None = None
) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted) into image paths, in a stable order.

    Files given explicitly are yielded whatever their suffix, so a bad file the user named is
    reported rather than silently skipped; inside folders only image suffixes are taken, hidden
    names are skipped and symlinked folders are followed (:func:`walk_images`, which also says
    what ``unreadable`` gets).
    """
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in walk_images(p, unreadable=unreadable):
                yield Path(f)
        else:
            yield p


def check_header(data: bytes, max_pixels: int = MAX_PIXELS, resize_shorter: int | None = None) -> str | None:
    """None if ``data`` (a whole file) is an image DALI can decode at an acceptable size, else the cause.

    Only the header is parsed (PIL's lazy open), except for :data:`PIL_VERIFIED_FORMATS`, which
    PIL decodes in full because DALI would return pixels from a corrupt file of those formats.
    Files PIL reads but DALI does not are refused by name: a PFM (float PNM) by its magic number,
    a WebP whose EXIF chunk DALI's parser misses by its chunk headers (:func:`_dali_webp_cause`).
    ``max_pixels`` is the only pixel limit applied here, PIL's own one included (its
    ``Image.MAX_IMAGE_PIXELS`` does not apply in the checking thread, :func:`_project_pixel_limit`).
    DALI's decoders can crash the process on some non-image inputs instead of raising, which is
    why nothing reaches them unchecked. ``resize_shorter``: the size the shorter side is resized
    to (the validation resize); the resized image must also stay under ``max_pixels``, so a very
    thin image (1 x 200,000) cannot make the resize allocate gigabytes.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, corrupt-EXIF and TIFF tag notes
            with _project_pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                fmt = im.format or "unknown"
                if fmt not in DALI_FORMATS:
                    return f"unsupported image format {fmt} (the decoder reads {_dali_format_list()})"
                if fmt == "WEBP" and (cause := _dali_webp_cause(data)):
                    return cause
                if fmt == "PPM" and data[:2] not in _PNM_MAGIC:  # PIL's float PNM (PFM) and own variants
                    name = "PFM" if data[:2] == b"Pf" else f"PNM variant {data[:6]!r}"
                    return f"unsupported image format {name} (the decoder reads {_dali_format_list()})"
                if fmt in ("JPEG", "MPO", "PNG") and (cause := _truncation_cause(fmt, data)):
                    return cause
                if fmt in PIL_VERIFIED_FORMATS and w * h <= max_pixels:
                    try:
                        im.load()
                    except Exception as e:
                        return f"corrupt {DALI_FORMATS[fmt]} image ({type(e).__name__}: {e})"
    except Image.DecompressionBombError as e:
        return str(e)  # raised with the project's limit and message (_project_pixel_limit)
    except UnidentifiedImageError:
        fmt = _signature_format(data)
        if fmt:
            return f"damaged {fmt} file (it starts like one, but its header cannot be read: truncated or corrupt)"
        return "not an image (unrecognised file format)"
    except Exception as e:
        return f"unreadable image header ({type(e).__name__}: {e})"
    if w * h > max_pixels:
        return _too_large(w, h, max_pixels)
    if w < 1 or h < 1:
        return f"bad image size {w}x{h} in the {fmt} header"
    if resize_shorter is not None:
        short, long = min(w, h), max(w, h)
        rw, rh = (resize_shorter, -(-resize_shorter * long // short))
        rw, rh = (rw, rh) if w <= h else (rh, rw)
        if rw * rh > max_pixels:
            return (
                f"image too thin: {w}x{h} resized to {rw}x{rh} = {rw * rh:,} pixels exceeds the limit of "
                f"{max_pixels:,} pixels (aspect ratio {max(w, h) / min(w, h):,.0f}:1)"
            )
    return None


def _truncation_cause(fmt: str, data: bytes) -> str | None:
    """Why this JPEG (or MPO) or PNG file ends too early, or None; from its structure alone.

    DALI fails the whole batch on a file cut short (an interrupted download or copy), even one
    that lacks only the closing marker, while PIL's lazy open reads the header and finds nothing
    wrong. A JPEG must close with an end-of-image marker (FF D9) after its first scan: the marker
    segments are stepped over by their lengths up to the first start-of-scan (so the end marker of
    an EXIF thumbnail does not count), and past it no FF D9 can occur but the real end (the
    entropy-coded data stuffs every FF byte). A PNG must reach its IEND chunk, chunk by chunk.
    Bytes after the end (camera trailers) are allowed, as DALI allows them. A JPEG cut short and
    then padded with zero bytes (a fixed-size buffer) is refused too, though DALI returns pixels
    for it: those of the lost part are not the image's.
    """
    n = len(data)
    if fmt == "PNG":
        pos = 8
        while pos + 8 <= n:
            size = int.from_bytes(data[pos : pos + 4], "big")
            if data[pos + 4 : pos + 8] == b"IEND":
                if pos + 12 <= n:  # with its CRC, which libpng reads too
                    return None
                break
            pos += 12 + size  # length, type, data, CRC
        return "truncated PNG file (it ends before its IEND chunk)"
    pos = 2  # after SOI
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them too, with a warning
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 2 if marker != 0xFF else 1  # fill byte, or a marker without a length
            continue
        if marker == 0xD9:
            return "truncated JPEG file (it ends before its first scan)"
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if data.rfind(b"\xff\xd9", pos + 2) >= 0:  # from the end: where the marker is
                return None
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return "truncated JPEG file (it ends before its end-of-image marker)"


_PNM_MAGIC = frozenset({b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"})  # the PNM files DALI decodes


def _dali_format_list() -> str:
    return ", ".join(sorted(set(DALI_FORMATS.values())))


def _dali_webp_cause(data: bytes) -> str | None:
    """Why DALI cannot read this WebP file that PIL reads, or None; from the chunk headers only.

    An extended WebP (a VP8X chunk first) whose flags announce EXIF metadata sends DALI 2.4's WebP
    parser (nvImageCodec's ``src/parsers/webp.cpp``) looking for the EXIF chunk, for the
    orientation. It steps from chunk to chunk by the size in each header but leaves out the pad
    byte that RIFF puts after an odd-sized chunk, so past one (a lossless VP8L image chunk has an
    odd size half the time; libwebp pads lossy VP8 data to an even size) it reads a header one byte
    off, runs off the end of the file and fails the whole batch. The same walk is done here: where
    it finds the EXIF chunk DALI does too.
    """
    if len(data) < 21 or data[12:16] != b"VP8X" or not data[20] & 0x08:  # no EXIF flag
        return None
    pos = 20 + int.from_bytes(data[16:20], "little")  # the end of VP8X's data, as DALI steps
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"EXIF":
            if pos + 8 + size <= len(data):
                return None
            break
        pos += 8 + size
    # what is wrong, from the chunks as RIFF lays them out (pad bytes included)
    tags, pos = [], 12
    while pos + 8 <= len(data) and data[pos : pos + 4] != b"EXIF":
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        tags.append((data[pos : pos + 4].decode("latin-1").strip(), size))
        pos += 8 + size + (size & 1)
    odd = next((tag for tag, size in tags if size & 1), None)
    missed = "its parser does not skip RIFF pad bytes and misses the EXIF chunk"
    if pos + 8 > len(data):
        what, why = "WebP whose header announces EXIF metadata that it does not hold", "its parser looks for it"
    elif odd == "VP8L":
        what, why = "lossless WebP with EXIF metadata (after odd-sized VP8L image data)", missed
    elif odd:
        what, why = f"WebP with EXIF metadata after an odd-sized {odd} chunk", missed
    else:
        what, why = "WebP with EXIF metadata", "its parser cannot find the EXIF chunk"
    return f"{what}: DALI 2.4's WebP decoder cannot read it ({why}); re-save it without EXIF, or as lossy WebP or PNG"


def _too_large(w: int, h: int, max_pixels: int) -> str:
    return (
        f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
        f"pixels (possible decompression bomb)"
    )


# PIL guards against decompression bombs itself: ``Image.open`` (and the WebP, TIFF, GIF, ...
# plugins, for canvases and tiles) calls ``Image._decompression_bomb_check(size)``, which refuses
# more than 2 x ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels), a process-wide setting. Inside
# check_header the project's ``max_pixels`` must apply instead, larger or smaller, with its own
# message. Changing the global for the header read would change it for every thread of the
# process meanwhile (serve's reader thread and Triton's threads call check_header while others
# decode), so the check is wrapped once instead: in a thread that is inside check_header it applies
# that call's ``max_pixels``; everywhere else PIL's own check runs, unchanged.
_limit = threading.local()  # .max_pixels: the limit of the check_header running in this thread
_wrap_lock = threading.Lock()
_wrapper: Callable[..., None] | None = None


def _wrap_bomb_check() -> None:
    global _wrapper
    from PIL import Image

    with _wrap_lock:
        pil_check = getattr(Image, "_decompression_bomb_check", None)
        if pil_check is None or pil_check is _wrapper:
            return  # a PIL without this private hook: its own limit applies (above ~179 M pixels)

        def bomb_check(size: tuple[int, int], *args: object, **kwargs: object) -> None:
            max_pixels = getattr(_limit, "max_pixels", None)
            if max_pixels is None:
                return pil_check(size, *args, **kwargs)
            w, h = size
            if max(1, w) * max(1, h) > max_pixels:
                raise Image.DecompressionBombError(_too_large(w, h, max_pixels))

        _wrapper = Image._decompression_bomb_check = bomb_check


@contextmanager
def _project_pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb check applies ``max_pixels`` in this thread while inside."""
    from PIL import Image

    if getattr(Image, "_decompression_bomb_check", None) is not _wrapper:
        _wrap_bomb_check()
    outer = getattr(_limit, "max_pixels", None)
    _limit.max_pixels = max_pixels
    try:
        yield
    finally:
        _limit.max_pixels = outer


def _signature_format(data: bytes) -> str | None:
    """The image format ``data`` starts like, from its first bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    return None  # (BMP's two-byte "BM" is too weak a signature to name)


def check_files(
    files: list[str], max_report: int = 10, progress: bool = True, resize_shorter: int | None = None
) -> None:
    """Check every file with :func:`check_header`; DataError naming the bad ones (up to ``max_report``)."""
    bad = bad_files(files, progress=progress, resize_shorter=resize_shorter)
    if bad:
        raise DataError(bad_files_message(bad, max_report))


def bad_files(files: list[str], progress: bool = True, resize_shorter: int | None = None) -> list[tuple[str, str]]:
    """``(path, cause)`` for each of ``files`` that cannot be read or that :func:`check_header` refuses."""
    from tqdm import tqdm

    bad: list[tuple[str, str]] = []
    it = tqdm(
        files,
        desc="checking images",
        unit="file",
        mininterval=2.0,
        leave=False,
        disable=not progress or len(files) < 20000,
    )
    for f in it:
        try:
            data = read_encoded(f).tobytes()  # a FIFO named like an image would block the check
        except DataError as e:
            bad.append((f, strip_path(f, str(e))))
            continue
        cause = check_header(data, resize_shorter=resize_shorter)
        if cause:
            bad.append((f, cause))
    return bad


def bad_files_message(bad: Sequence[tuple[str, str]], max_report: int = 10) -> str:
    """The error for :func:`bad_files`' findings: their count and the first ``max_report`` of them."""
    more = f" (and {len(bad) - max_report} more)" if len(bad) > max_report else ""
    return f"{len(bad)} bad image file(s): " + "; ".join(f"{f}: {c}" for f, c in bad[:max_report]) + more


def strip_path(path: str | os.PathLike[str], message: str) -> str:
    """The cause alone of a DataError message ``<path>: <cause>``."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def read_encoded(path: str | os.PathLike[str]) -> np.ndarray:
    """The bytes of an image file; DataError naming ``path`` if it cannot be read, is empty, or is
    not a regular file (a FIFO or device would block or never end)."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if os.path.isdir(path) else "not a regular file (a FIFO, socket or device)"
            raise DataError(f"{path}: {kind}")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    return np.frombuffer(data, dtype=np.uint8)


def read_checked(files: Sequence[str], p: Preprocessing) -> list[np.ndarray]:
    """Read ``files`` and check each one (:func:`rn50.layout.check_header`, with the resize bound
    of ``p``) before DALI sees it; DataError ``undecodable image(s): <path>: <cause>; ...``
    naming every bad one. For the stages that need every image of a list (export parity, INT8
    calibration and its gate): one bad image stops them, named, before any output is written."""
    out: list[np.ndarray] = []
    bad: list[str] = []
    for f in files:
        try:
            data = read_encoded(f)
        except DataError as e:
            bad.append(str(e))
            continue
        cause = check_header(data.tobytes(), resize_shorter=p.resize_size)
        if cause:
            bad.append(f"{f}: {cause}")
        out.append(data)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError("undecodable image(s): " + "; ".join(bad[:5]) + more)
    return out


def balanced_subset(
    files: Sequence[str], labels: Sequence[int], n: int | None, seed: int = 0
) -> tuple[list[str], list[int]]:
    """``n`` of ``files`` with their ``labels``, class-balanced and deterministic: ceil(n / classes)
    drawn from each class with ``seed``, shuffled together, the first ``n`` kept (all of them,
    shuffled, when ``n`` is not below their number). A class with fewer images gives all it has
    and the others give more, evenly, so that ``n`` are still drawn (with every class large enough,
    the draw is the same). All of them in their order when ``n`` is None."""
    if n is None:
        return list(files), list(labels)
    rng = np.random.default_rng(seed)
    labels_a = np.asarray(labels)
    classes = np.unique(labels_a)
    drawn = [rng.permutation(np.flatnonzero(labels_a == c)) for c in classes]
    per_class = -(-n // max(1, len(classes)))
    sizes = [len(d) for d in drawn]
    while sum(min(k, per_class) for k in sizes) < min(n, len(labels_a)):
        per_class += 1  # a short class: the others make up for it
    picked = [i for d in drawn for i in d[:per_class].tolist()]
    order = rng.permutation(np.asarray(picked, dtype=np.int64))[:n]
    return [files[i] for i in order], [int(labels_a[i]) for i in order]
