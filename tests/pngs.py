"""A picture check shared by the tests of the stages that draw one."""

from __future__ import annotations

from pathlib import Path


def check_png(
    path: Path,
    min_size: tuple[int, int] = (300, 200),
    max_size: tuple[int, int] = (2500, 2000),
    max_bytes: int = 600_000,
) -> tuple[int, int]:
    """``path`` is a PNG that PIL decodes, of a readable size (width, height within the bounds) and
    with a drawing on it (many colours, not a blank canvas); returns its size."""
    from PIL import Image

    assert path.is_file(), f"{path} was not written"
    assert 0 < path.stat().st_size <= max_bytes, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.format == "PNG", f"{path}: {im.format}"
        im.load()
        w, h = im.size
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert min_size[0] <= w <= max_size[0] and min_size[1] <= h <= max_size[1], f"{path}: {w}x{h}"
    assert colours is None or len(colours) > 20, f"{path}: only {len(colours or [])} colours, nothing drawn?"
    return w, h
