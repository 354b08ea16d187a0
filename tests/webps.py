"""WebP files for the tests of what DALI's WebP decoder reads (``rn50.layout.check_header``)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def chunks(webp: bytes) -> list[tuple[bytes, bytes]]:
    """The (tag, data) chunks of a WebP file, as RIFF lays them out."""
    out, pos = [], 12
    while pos + 8 <= len(webp):
        size = int.from_bytes(webp[pos + 4 : pos + 8], "little")
        out.append((webp[pos : pos + 4], webp[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return out


def riff(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A WebP file of these (tag, data) chunks, each odd-sized one followed by its pad byte."""
    body = b"WEBP" + b"".join(t + len(p).to_bytes(4, "little") + p + b"\0" * (len(p) & 1) for t, p in parts)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def webp(parity: int | None = None, source: np.ndarray | None = None, **kw) -> bytes:
    """A WebP saved by PIL with ``kw`` (``lossless=True``, ``exif=...``): of ``source`` (an RGB
    array), else of random pixels. With ``parity``, one whose image chunk (VP8L or VP8) has an odd
    (1) or even (0) size, found by trying a few heights (``source`` loses rows from the bottom)."""
    for k in range(24):
        arr = np.random.default_rng(k).integers(0, 255, (16 + k, 24, 3), dtype=np.uint8) if source is None else source
        b = io.BytesIO()
        Image.fromarray(arr if source is None else arr[: len(arr) - k]).save(b, "WEBP", **kw)
        image_chunk = next(p for t, p in chunks(b.getvalue()) if t in (b"VP8L", b"VP8 "))
        if parity is None or len(image_chunk) % 2 == parity:
            return b.getvalue()
    raise AssertionError(f"no WebP with an image chunk of parity {parity}")


def lossless_with_exif(source: np.ndarray | None = None) -> bytes:
    """A lossless WebP with EXIF metadata that DALI 2.4 cannot read (its VP8L chunk has an odd size)."""
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: normal
    return webp(1, source, lossless=True, exif=exif.tobytes())
