"""The data-set layout rules (``rn50.layout``): which files a folder scan takes, and what the header
check refuses before DALI sees a file. Every image here is a tiny real file written by PIL."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from rn50.errors import DataError
from rn50.layout import DALI_FORMATS, IMG_EXTENSIONS, iter_inputs, scan_split
from tests.webps import chunks, lossless_with_exif, riff, webp

# every suffix PIL registers for a format DALI decodes (less .pfm, float PNM, which DALI does not
# read), some in upper case: a folder of them is scanned as a folder of .jpg files is
SUFFIXES = [
    ".jpg", ".JPEG", ".jpe", ".jfif", ".JFIF", ".mpo", ".png", ".apng", ".bmp", ".tif", ".TIFF",
    ".webp", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".pnm", ".pbm", ".pgm", ".PPM",
]  # fmt: skip


def _image(suffix: str, size: tuple[int, int] = (24, 20)) -> bytes:
    """A small image in the format ``suffix`` names (PIL's registry), as a file's bytes."""
    Image.init()
    fmt = Image.registered_extensions()[suffix.lower()]
    rng = np.random.default_rng(len(suffix))
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    kw: dict = {}
    if suffix.lower() == ".pbm":
        im = im.convert("1")
    elif suffix.lower() == ".pgm":
        im = im.convert("L")
    elif fmt == "MPO":
        kw = {"save_all": True, "append_images": [im]}
    elif fmt == "JPEG2000":
        kw = {"no_jp2": suffix.lower() in (".j2k", ".j2c", ".jpc")}  # a bare codestream
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def dali_decodes():
    """``dali_decodes(data)``: whether DALI 2.4's CPU decoder (the validation pipeline that serving,
    export and calibration use) decodes ``data``."""
    from rn50.batches import Preprocessor
    from rn50.preprocess import Preprocessing

    pre = Preprocessor(Preprocessing.for_image_size(32), batch_size=1, device="cpu", num_threads=1)

    def decodes(data: bytes) -> bool:
        try:
            pre([np.frombuffer(data, np.uint8)])
            return True
        except RuntimeError:
            pre.rebuild()
            return False

    return decodes


# --------------------------------------------------------------------------- which files a scan takes


def test_suffixes_are_those_pil_registers_for_dali_formats():
    Image.init()
    want = {s for s, f in Image.registered_extensions().items() if f in DALI_FORMATS} - {".pfm"}
    assert set(IMG_EXTENSIONS) == want


def test_a_folder_of_every_dali_suffix_is_scanned_whole(tmp_path, dali_decodes):
    """.jfif, .jpe, .pgm, .jp2, ... in any case: a folder scan takes each file (as naming them
    does), and DALI decodes each one."""
    named = []
    for i, suffix in enumerate(SUFFIXES):
        f = tmp_path / "val" / "a" / f"{i:02d}{suffix}"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(_image(suffix))
        named.append(str(f))
    split = scan_split(tmp_path / "val")
    assert split.files == named
    assert [str(p) for p in iter_inputs([tmp_path / "val"])] == named
    assert [f for f in named if not dali_decodes(open(f, "rb").read())] == []


def _png(path, size: tuple[int, int] = (8, 6)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)
    return str(path)


def _linked_tree(tmp_path):
    """val/a with a symlinked subfolder (twice), links back to its own folders (loops), and a
    symlinked class folder val/c; returns the files a scan of val/a must take, in order."""
    ext = tmp_path / "ext"
    _png(ext / "more" / "x.png"), _png(ext / "more" / "y.png"), _png(ext / "cls" / "c.png")
    a = tmp_path / "val" / "a"
    want = [_png(a / "1.png")]
    (a / "again").symlink_to("../../ext/more")  # taken (first in sorted order) ...
    (a / "linked").symlink_to("../../ext/more")  # ... so this second way to ext/more is not
    want += [str(a / "again" / "x.png"), str(a / "again" / "y.png")]
    want.append(_png(a / "sub" / "2.png"))
    (a / "sub" / "loop").symlink_to("..")  # the class folder itself: not entered again
    (a / "sub" / "self").symlink_to(".")
    (a / "sub" / "up").symlink_to("../..")  # val/, above the class folder: its other classes are not a's
    (tmp_path / "val" / "c").symlink_to("../ext/cls")
    return want


def test_symlinked_subfolders_are_followed_once_in_a_split(tmp_path):
    want = _linked_tree(tmp_path)
    split = scan_split(tmp_path / "val")
    assert split.classes == ["a", "c"]
    assert split.files == [*want, str(tmp_path / "val" / "c" / "c.png")]
    assert split.labels == [0] * len(want) + [1]


def test_symlinked_subfolders_are_followed_once_in_an_input_folder(tmp_path):
    want = _linked_tree(tmp_path)
    (tmp_path / "val" / "a" / "top").symlink_to(".")
    assert [str(p) for p in iter_inputs([tmp_path / "val" / "a"])] == want


def test_hidden_files_and_folders_are_skipped_at_every_level(tmp_path):
    """``val/b/.cache/thumb.jpg`` is no class-b image, nor is macOS's AppleDouble ``._x.jpg`` (a
    metadata file, not an image); hidden class folders were already skipped."""
    val = tmp_path / "val"
    want = [_png(val / "a" / "x.png"), _png(val / "b" / "y.png"), _png(val / "b" / "sub" / "z.png")]
    _png(val / "b" / ".cache" / "thumb.png")
    _png(val / "b" / "sub" / ".hidden" / "deep.png")
    _png(val / ".trash" / "t.png")
    (val / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07AppleDouble metadata, not an image")
    (val / "b" / "sub" / ".y.png").write_bytes(_image(".png"))
    (val / "b" / "sub" / ".git").symlink_to("..")
    split = scan_split(val)
    assert (split.classes, split.files, split.labels) == (["a", "b"], want, [0, 1, 1])
    assert [str(p) for p in iter_inputs([val])] == want
    # a hidden file named explicitly is still tried (and reported if it is no image)
    assert list(iter_inputs([val / "a" / "._x.png"])) == [val / "a" / "._x.png"]


# --------------------------------------------------------------------------- the header check


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR (with a valid CRC) declares w x h: a decompression bomb's header."""
    import zlib

    png = _image(".png", (8, 8))
    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = w.to_bytes(4, "big") + h.to_bytes(4, "big")
    return png[:12] + bytes(ihdr) + zlib.crc32(bytes(ihdr)).to_bytes(4, "big") + png[33:]


def test_max_pixels_applies_exactly_above_pils_own_limit():
    """PIL refuses more than 2 x Image.MAX_IMAGE_PIXELS (about 179 M pixels) in Image.open; the
    project's --max-pixels must apply instead, above it too, with its own numbers."""
    from rn50.layout import check_header

    assert 2 * Image.MAX_IMAGE_PIXELS < 20_000 * 10_000
    assert check_header(_png_claiming(20_000, 10_000), max_pixels=500_000_000) is None
    cause = check_header(_png_claiming(30_000, 20_000), max_pixels=500_000_000)
    assert cause == (
        "image too large: 30000x20000 = 600,000,000 pixels exceeds the limit of 500,000,000 pixels "
        "(possible decompression bomb)"
    )
    assert "too large: 30000x20000" in check_header(_png_claiming(30_000, 20_000))  # the default, 100 M


def test_max_pixels_applies_to_the_full_decode_and_only_in_the_checking_thread(monkeypatch):
    """A TIFF (decoded in full by the check) larger than PIL's limit but within max_pixels passes;
    meanwhile, PIL's own limit still holds for another thread, and afterwards for this one. PIL's
    limit is lowered here (to 100: refused above 200 pixels) so that a 30 x 20 image is "large"."""
    import threading

    from PIL import TiffImagePlugin

    from rn50.layout import check_header

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    tiff = _image(".tif", (30, 20))
    inside, release = threading.Event(), threading.Event()
    load = TiffImagePlugin.TiffImageFile.load

    def held_load(self):
        inside.set()
        assert release.wait(10)
        return load(self)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", held_load)
    result: list = []
    t = threading.Thread(target=lambda: result.append(check_header(tiff, max_pixels=1_000)))
    t.start()
    while t.is_alive() and not inside.wait(0.01):
        pass
    try:
        assert inside.is_set(), f"check_header did not reach the full decode: {result}"
        with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 200 pixels"):
            Image.open(io.BytesIO(tiff))  # another thread, meanwhile: PIL's own limit
        assert Image.MAX_IMAGE_PIXELS == 100
    finally:
        release.set()
        t.join(10)
    assert result == [None]
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", load)
    assert "exceeds the limit of 500 pixels" in check_header(tiff, max_pixels=500)
    with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 200 pixels"):
        Image.open(io.BytesIO(tiff))  # this thread, afterwards


def _webp_variants() -> dict[str, tuple[bytes, str | None]]:
    """WebP files: (bytes, the cause check_header must give, None where DALI decodes the file)."""
    exif = Image.Exif()
    exif[0x0112] = 1
    ex, xmp = exif.tobytes(), b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'
    frames = [Image.new("RGB", (24, 16), c) for c in ("red", "blue")]
    anim = io.BytesIO()
    frames[0].save(anim, "WEBP", save_all=True, append_images=frames[1:], lossless=True, exif=ex)
    lossy, lossless = webp(quality=80), webp(1, lossless=True)

    def vp8x(image: bytes) -> tuple[bytes, bytes]:  # a VP8X chunk (EXIF flag set) for that image
        w, h = Image.open(io.BytesIO(image)).size
        return b"VP8X", bytes([0x08, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")

    lossless_exif = "lossless WebP with EXIF metadata"
    return {
        "lossless": (webp(1, lossless=True), None),
        "lossy": (webp(quality=80), None),
        "lossless_exif_odd_image": (lossless_with_exif(), lossless_exif),
        "lossless_exif_xmp_odd_image": (webp(1, lossless=True, exif=ex, xmp=xmp), lossless_exif),
        "lossless_exif_even_image": (webp(0, lossless=True, exif=ex), None),
        "lossless_xmp_odd_image": (webp(1, lossless=True, xmp=xmp), None),
        "lossy_exif": (webp(quality=80, exif=ex), None),
        "lossy_xmp": (webp(quality=80, xmp=xmp), None),
        "animated_exif": (anim.getvalue(), None),
        "odd_chunk_before_lossy_exif": (
            riff([vp8x(lossy), chunks(lossy)[0], (b"ABCD", b"odd"), (b"EXIF", ex[6:])]),
            "WebP with EXIF metadata after an odd-sized ABCD chunk",
        ),
        "exif_flag_without_exif": (
            riff([vp8x(lossy), chunks(lossy)[0]]),
            "announces EXIF metadata that it does not hold",
        ),
        "exif_before_odd_image": (riff([vp8x(lossless), (b"EXIF", ex[6:]), chunks(lossless)[0]]), None),
    }


@pytest.mark.parametrize("variant", list(_webp_variants()))
def test_webp_refused_exactly_where_dali_fails(variant, dali_decodes):
    """A lossless WebP with EXIF passed the header check and then failed DALI's decoder (serving:
    "DALI's WebP decoder rejects it"; training: a batch failed mid-epoch). check_header refuses
    exactly the files DALI cannot read, named, with what to do; DALI decodes the others."""
    from rn50.layout import check_header

    data, want = _webp_variants()[variant]
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # PIL reads each one
    cause = check_header(data)
    assert dali_decodes(data) == (want is None), "the expectation no longer matches DALI's decoder"
    if want is None:
        assert cause is None
    else:
        assert cause is not None and want in cause and "re-save it without EXIF" in cause, cause


def test_float_pnm_is_refused_as_unsupported(dali_decodes):
    """PIL reads PFM (a floating-point PNM, format "PPM" to PIL); DALI does not."""
    from rn50.layout import check_header

    b = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 20 * 24, dtype=np.float32).reshape(20, 24)).save(b, "PPM")
    assert b.getvalue().startswith(b"Pf") and not dali_decodes(b.getvalue())
    assert check_header(b.getvalue()).startswith("unsupported image format PFM")
    assert check_header(_image(".pgm")) is None and dali_decodes(_image(".pgm"))


def _truncation_variants() -> dict[str, tuple[bytes, str | None]]:
    """JPEG and PNG files cut short at several places, or whole with bytes after their end: each
    with the start of check_header's cause, or None where DALI decodes it."""
    rng = np.random.default_rng(7)
    im = Image.fromarray(np.clip(rng.normal(128, 40, (120, 160, 3)), 0, 255).astype(np.uint8))

    def enc(fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    jpeg, prog, png = enc("JPEG", quality=90), enc("JPEG", quality=90, progressive=True), enc("PNG")
    # a whole small JPEG in an APP11 segment, as an EXIF thumbnail is: its end marker comes before
    # the main image's first scan and must not count as the main image's end
    thumb = im.resize((16, 12))
    tb = io.BytesIO()
    thumb.save(tb, "JPEG")
    app = b"\xff\xeb" + (len(tb.getvalue()) + 2).to_bytes(2, "big") + tb.getvalue()
    with_thumb = jpeg[:2] + app + jpeg[2:]
    cut_jpeg, cut_png = "truncated JPEG file", "truncated PNG file"
    return {
        "jpeg": (jpeg, None),
        "jpeg_without_end_marker": (jpeg[:-2], cut_jpeg),
        "jpeg_cut_in_its_scan": (jpeg[: len(jpeg) * 6 // 10], cut_jpeg),
        "jpeg_with_trailing_bytes": (jpeg + b"\xff\xd8 a camera trailer" * 40, None),
        "progressive": (prog, None),
        "progressive_cut_between_scans": (prog[: len(prog) * 8 // 10], cut_jpeg),
        "jpeg_with_thumbnail": (with_thumb, None),
        "jpeg_with_thumbnail_cut": (with_thumb[: len(with_thumb) * 6 // 10], cut_jpeg),
        "png": (png, None),
        "png_without_iend": (png[:-12], cut_png),
        "png_without_the_iend_crc": (png[:-2], cut_png),
        "png_cut_in_its_data": (png[: len(png) // 2], cut_png),
        "png_with_trailing_bytes": (png + b"x" * 50, None),
    }


@pytest.mark.parametrize("variant", list(_truncation_variants()))
def test_truncated_files_refused_exactly_where_dali_fails(variant, dali_decodes):
    """PIL's lazy open reads a cut-short JPEG or PNG without complaint, and DALI then fails the
    whole batch on it: check_header names it instead, and passes what DALI decodes."""
    from rn50.layout import check_header

    data, want = _truncation_variants()[variant]
    assert dali_decodes(data) == (want is None), "the expectation no longer matches DALI's decoder"
    cause = check_header(data)
    assert cause is None if want is None else (cause or "").startswith(want), cause


def _unlistable(monkeypatch, folder) -> None:
    """Make listing ``folder`` fail as it does without read permission (which root, running the
    tests here, always has): ``os.walk`` lists folders with ``os.scandir``."""
    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == os.path.abspath(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch):
    val = tmp_path / "val"
    _png(val / "a" / "x.png"), _png(val / "b" / "y.png"), _png(val / "b" / "locked" / "z.png")
    _unlistable(monkeypatch, val / "b" / "locked")
    # a split would silently lose those images: it stops, naming the folder
    with pytest.raises(DataError, match=rf"^{re.escape(str(val / 'b' / 'locked'))}: cannot list this folder"):
        scan_split(val)
    # an input scan goes on, and hands the folder and its error to the caller
    unlisted: list[tuple[str, str]] = []
    got = list(iter_inputs([val], unreadable=lambda d, e: unlisted.append((d, e.strerror))))
    assert got == [val / "a" / "x.png", val / "b" / "y.png"]
    assert unlisted == [(str(val / "b" / "locked"), "Permission denied")]


@pytest.mark.parametrize("link", ["class_folder", "subfolder"])
def test_a_folder_reached_from_two_classes_is_refused(tmp_path, link):
    """Through a link, one folder's images would be labelled with two classes."""
    val = tmp_path / "val"
    _png(val / "a" / "x.png"), _png(val / "a" / "sub" / "y.png")
    if link == "class_folder":
        (val / "b").symlink_to("a")
        where = val / "b"
    else:
        _png(val / "b" / "z.png")
        (val / "b" / "more").symlink_to("../a/sub")
        where = val / "b" / "more"
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(where))}: the same folder .* under {re.escape(str(val / 'a'))}"
    ):
        scan_split(val)
    # one input folder may reach a folder twice; it is taken once, as before
    assert len(list(iter_inputs([val]))) == 2 + (link == "subfolder")


@pytest.mark.parametrize("train_form, val_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_class_names_that_differ_only_in_unicode_normalisation(tmp_path, train_form, val_form):
    """Composed and decomposed accents print alike: the refusal says what differs and what to do."""
    import unicodedata

    from rn50.layout import load_dataset

    name = "sac à dos"
    for split, form in (("train", train_form), ("val", val_form)):
        _png(tmp_path / split / "coat" / "x.png")
        _png(tmp_path / split / unicodedata.normalize(form, name) / "x.png")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    composed, decomposed = r"'sac \xe0 dos'", r"'sac a\u0300 dos'"
    train_shown, val_shown = (composed, decomposed) if train_form == "NFC" else (decomposed, composed)
    assert msg.startswith(f"{tmp_path / 'val'}: class folders differ from the training classes"), msg
    assert f"differs only in Unicode normalisation: the training class is {train_form} ({train_shown})" in msg
    assert f"this folder's {val_form} ({val_shown})" in msg
    assert msg.endswith("rename the class folders here to the training classes' form"), msg
    # names that differ otherwise get no such note
    (tmp_path / "val" / unicodedata.normalize(val_form, name)).rename(tmp_path / "val" / "sac")
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert f"missing: {[unicodedata.normalize(train_form, name)]}" in str(e.value)
    assert "normalisation" not in str(e.value)


def test_a_short_class_is_made_up_for_by_the_others():
    """--limit-train N gives N images even when a class has fewer than its share; with every class
    large enough the draw is what it always was (seeded, balanced)."""
    from rn50.layout import balanced_subset

    labels = [0] * 2 + [1] * 40 + [2] * 40
    files = [f"f{i}" for i in range(len(labels))]
    got_files, got = balanced_subset(files, labels, 30, seed=4)
    assert len(got) == 30 and sorted(np.bincount(got).tolist()) == [2, 14, 14]
    assert len(set(got_files)) == 30
    assert balanced_subset(files, labels, 500, seed=4)[1].count(0) == 2  # more than there are: all of them
    # every class large enough: ceil(n / classes) from each, the first n kept
    even = [0] * 20 + [1] * 20 + [2] * 20
    _, got = balanced_subset([f"f{i}" for i in range(60)], even, 30, seed=4)
    assert np.bincount(got).tolist() == [10, 10, 10]


def test_a_fifo_named_like_an_image_does_not_block_the_check(tmp_path):
    from rn50.layout import check_files

    _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'b.png'))}: not a regular file"):
        check_files([str(tmp_path / "a.png"), str(tmp_path / "b.png")])


def test_dalis_own_words_are_taken_from_its_error():
    """DALI's exception opens with pipeline boilerplate and the operator's traceback; the line an
    error message quotes is what DALI says after "encountered:"."""
    from rn50.batches import Preprocessor
    from rn50.errors import dali_message
    from rn50.preprocess import Preprocessing

    b = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(b, "GIF")  # a format DALI does not decode
    pre = Preprocessor(Preprocessing.for_image_size(32), batch_size=1, device="cpu", num_threads=1)
    with pytest.raises(RuntimeError) as e:
        pre([np.frombuffer(b.getvalue(), np.uint8)])
    assert str(e.value).startswith("Critical error in pipeline")
    said = dali_message(e.value)
    assert said and "pipeline" not in said.lower() and "operator" not in said.lower(), said
