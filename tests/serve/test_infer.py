"""serve.infer on real images: predictions against PyTorch, bad inputs, exit codes, output file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve import infer
from tests.jpegs import bogus_huffman, jpeg_segments
from tests.serve_cli import image_size_refusal
from tests.stderr import error_line


def run_infer(capsys, engine: Path, inputs: list, *extra: str) -> tuple[int, list[dict], str]:
    rc = infer.main(["--engine", str(engine), *map(str, inputs), "--quiet", *extra])
    cap = capsys.readouterr()
    lines = [json.loads(ln) for ln in cap.out.splitlines() if ln.strip()]
    return rc, lines, cap.err


def good_images(fmnist: Path, n: int = 6) -> list[Path]:
    files = sorted((fmnist / "val").rglob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


def pytorch_top1(ckpt: Path, paths: list[Path]) -> dict[str, int]:
    """Top-1 of the eager PyTorch checkpoint on the same DALI preprocessing (rn50.batches)."""
    import torch

    from rn50.batches import Preprocessor
    from rn50.checkpoint import load_model
    from rn50.layout import read_encoded
    from rn50.manifest import preprocessing_of

    model, man = load_model(ckpt)
    pre = Preprocessor(preprocessing_of(man), len(paths))
    x = pre([read_encoded(p) for p in paths])
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)).numpy()
    return {str(p): int(i) for p, i in zip(paths, logits.argmax(1))}


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_pt2", "engine_checkpoint"])
def test_top1_matches_pytorch(request, capsys, engine_fixture, trained_run, fmnist_small, photos):
    engine = request.getfixturevalue(engine_fixture)
    imgs = good_images(fmnist_small, 20) + [photos[k] for k in ("jpeg", "png", "gray", "cmyk", "exif")]
    rc, lines, err = run_infer(capsys, engine, imgs, "--batch-size", "8")
    assert rc == 0, err
    assert [ln["path"] for ln in lines] == [str(p) for p in imgs]  # input order kept
    ref = pytorch_top1(trained_run / "best.pt", imgs)
    for ln in lines:
        assert ln["topk"][0] == ref[ln["path"]], ln["path"]
        assert len(ln["topk"]) == len(ln["classes"]) == len(ln["probs"]) == 5
        assert ln["probs"] == sorted(ln["probs"], reverse=True) and 0 < sum(ln["probs"]) <= 1.0001


def test_int8_agrees_with_pytorch(capsys, engine_int8_onnx, trained_run, fmnist_small):
    imgs = good_images(fmnist_small, 60)
    rc, lines, err = run_infer(capsys, engine_int8_onnx, imgs, "--batch-size", "16")
    assert rc == 0, err
    ref = pytorch_top1(trained_run / "best.pt", imgs)
    agree = np.mean([ln["topk"][0] == ref[ln["path"]] for ln in lines])
    assert agree >= 0.9, f"int8 top-1 agreement with PyTorch only {agree:.0%}"


def test_int8_agrees_with_fp32_on_photos(capsys, tmp_path, engine_fp32_onnx, engine_int8_onnx, photos):
    """The INT8 engine on real photographs (JPEG, PNG, grayscale, CMYK, EXIF-rotated, plus more of
    scikit-image's photos and textures), through serve.infer, against the FP32 ONNX engine (whose
    top-1 equals PyTorch's on these photos: test_top1_matches_pytorch).

    The model is a Fashion-MNIST classifier, so photographs are out of distribution: their
    activations exceed the ranges INT8 was calibrated on (Fashion-MNIST images), are clipped, and
    the top-1 of an image whose class is arbitrary anyway can flip (a trained model flipped 2 of
    these 16, e.g. the grayscale cameraman). Agreement with the correct class is meaningless here
    and exact agreement is not promised; what must hold is that INT8 follows FP32 on most photos:
    at least 70 % (11 of 16). In distribution the bound is 90 % (test_int8_agrees_with_pytorch)."""
    from PIL import Image
    from skimage import data

    imgs = [photos[k] for k in ("jpeg", "png", "gray", "cmyk", "exif")]
    for name in (
        "cat",
        "coins",
        "hubble_deep_field",
        "immunohistochemistry",
        "moon",
        "page",
        "text",
        "brick",
        "grass",
        "gravel",
        "retina",
    ):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.png")
        imgs.append(tmp_path / f"{name}.png")
    top1 = {}
    for engine in (engine_fp32_onnx, engine_int8_onnx):
        rc, lines, err = run_infer(capsys, engine, imgs, "--batch-size", "16")
        assert rc == 0, err
        assert [ln["path"] for ln in lines] == [str(p) for p in imgs]
        top1[engine] = np.array([ln["topk"][0] for ln in lines])
    agree = np.mean(top1[engine_fp32_onnx] == top1[engine_int8_onnx])
    assert agree >= 0.7, (
        f"int8 top-1 equals fp32's on only {agree:.0%} of {len(imgs)} photos: "
        f"fp32 {top1[engine_fp32_onnx].tolist()}, int8 {top1[engine_int8_onnx].tolist()}"
    )


def test_dali_matches_pil_reference_on_photos(photos):
    """The serving preprocessing (DALI) handles PNG, grayscale, CMYK and EXIF rotation like the
    PIL reference (load_rgb + torchvision_val); the EXIF one must match the upright image."""
    from rn50.batches import Preprocessor
    from rn50.layout import read_encoded
    from rn50.preprocess import Preprocessing, load_rgb, torchvision_val

    p = Preprocessing.for_image_size(64)
    pre = Preprocessor(p, 1)
    tv = torchvision_val(p)
    for k in ("jpeg", "png", "gray", "cmyk", "exif"):
        d = pre([read_encoded(photos[k])])[0]
        r = tv(load_rgb(photos[k])).numpy()
        assert np.abs(d - r).mean() < 0.08, k  # normalised units (1/std of 0-255 pixels)
    exif = pre([read_encoded(photos["exif"])])[0]
    upright = pre([read_encoded(photos["exif_upright"])])[0]
    assert np.abs(exif - upright).mean() < 0.08
    assert np.abs(exif - np.rot90(upright, 1, axes=(1, 2))).mean() > 0.3


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of ``a`` (H x W x 2, 3 or 4: gray + alpha, RGB, RGBA), written by hand: PIL
    writes 16-bit PNGs of one channel only."""
    import struct
    import zlib

    a = np.asarray(a, dtype=">u2")
    h, w, c = a.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(h))  # filter 0 on every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_dali_matches_pil_reference_on_high_bit_depth(tmp_path):
    """16-bit PNG (gray, gray + alpha, RGB, RGBA), 16-bit TIFF (both byte orders), 16-bit PGM and
    float TIFF: load_rgb decodes them to the pixels DALI's decoder gives (equal for one channel;
    within 1 level for several, which PIL opens as 8-bit keeping the high byte), so the PIL
    reference and the pytorch training backend preprocess them as serving does. PIL's own
    convert("RGB") clips one-channel 16-bit samples to 255 and float ones to 0 or 1."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image
    from skimage import data

    from rn50.batches import Preprocessor
    from rn50.layout import read_encoded
    from rn50.preprocess import Preprocessing, dali_decode, load_rgb, torchvision_val

    rng = np.random.default_rng(0)
    # photographs widened to 16 bits with a random low byte, so that rounding and truncation differ
    gray = data.camera()[::2, ::2].astype(np.uint32) * 257 + rng.integers(0, 257, (256, 256))
    rgb = data.astronaut()[::2, ::2].astype(np.uint32) * 257 + rng.integers(0, 257, (256, 256, 3))
    alpha = rng.integers(0, 65536, (256, 256, 1))
    files, several = {}, set()

    def save(name: str, im: Image.Image, **kw) -> None:
        files[name] = tmp_path / name
        im.save(files[name], **kw)

    save("gray16.png", Image.fromarray(gray.astype(np.uint16)))
    save("gray16.tif", Image.fromarray(gray.astype(np.uint16)))
    save("gray16_big_endian.tif", Image.fromarray(gray.astype(">u2")))
    save("float.tif", Image.fromarray((gray / 65535 * 1.2 - 0.1).astype(np.float32)))  # some below 0, above 1
    files["gray16.pgm"] = tmp_path / "gray16.pgm"
    files["gray16.pgm"].write_bytes(b"P5 256 256 65535\n" + gray.astype(">u2").tobytes())
    for name, a in (
        ("gray16_alpha.png", np.concatenate([gray[..., None], alpha], 2)),
        ("rgb16.png", rgb),
        ("rgba16.png", np.concatenate([rgb, alpha], 2)),
    ):
        files[name] = tmp_path / name
        files[name].write_bytes(_png16(a))
        several.add(name)
    modes = {name: Image.open(f).mode for name, f in files.items()}
    assert {modes[n] for n in files if n not in several} >= {"I;16", "I;16B", "I", "F"}, modes

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    def decode_only():
        return dali_decode(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1))

    p = Preprocessing.for_image_size(64)
    pre = Preprocessor(p, 1)
    tv = torchvision_val(p)
    for name, f in files.items():
        dec = decode_only()
        dec.build()
        dec.feed_input("encoded", [read_encoded(f)])
        decoded = np.array(dec.run()[0].as_tensor())[0].astype(int)
        pil = np.asarray(load_rgb(f)).astype(int)
        assert np.abs(decoded - pil).max() <= (1 if name in several else 0), name
        d = pre([read_encoded(f)])[0]
        r = tv(load_rgb(f)).numpy()
        assert np.abs(d - r).mean() < 0.08, name  # normalised units, as for the 8-bit photos above


def test_summary_and_topk_clipping(capsys, engine_fp32_onnx, fmnist_small):
    rc = infer.main(
        [
            "--engine",
            str(engine_fp32_onnx),
            str(good_images(fmnist_small, 1)[0]),
            "--topk",
            "50",
            "--batch-size",
            "100000",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0
    (line,) = [json.loads(x) for x in cap.out.splitlines()]
    assert len(line["topk"]) == 10  # clipped to the number of classes
    assert "summary: 1 images, 1 classified, 0 failed" in cap.err
    assert "p50" in cap.err and "p99" in cap.err and "onnxruntime" in cap.err and "ExecutionProvider" in cap.err


def test_summary_json(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    """--summary FILE: the figures bench.gpu_check reads, for a run with one undecodable file."""
    imgs = good_images(fmnist_small, 5)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    summ = tmp_path / "s.json"
    rc = infer.main(
        [
            "--engine",
            str(engine_fp32_onnx),
            *map(str, imgs),
            str(bad),
            "--batch-size",
            "2",
            "--decode-on",
            "cpu",
            "--summary",
            str(summ),
            "--quiet",
        ]
    )
    capsys.readouterr()
    assert rc == 1
    s = json.loads(summ.read_text())
    assert (s["images"], s["classified"], s["failed"], s["batch_size"]) == (6, 5, 1, 2)
    assert s["batches"] == 3 and s["images_per_s"] == pytest.approx(6 / s["seconds"])
    # the rate after the first batch (2 images), which also paid for starting DALI and the engine
    assert 0 < s["first_batch_s"] < s["seconds"]
    assert s["images_per_s_after_first_batch"] == pytest.approx(4 / (s["seconds"] - s["first_batch_s"]))
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p95"] <= s["latency_ms"]["p99"]
    assert (s["backend"], s["dali_device"], s["engine_device"]) == ("onnxruntime", "cpu", "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda(), reason="needs a CUDA GPU: --decode-on cpu only differs from auto where the engine runs on one"
)
def test_decode_on_cpu_with_the_engine_on_the_gpu(capsys, tmp_path, engine_checkpoint, fmnist_small):
    """The checkpoint engine on the GPU, fed once by DALI mixed and once by DALI on the CPU: the
    summaries say where each part ran, and the two decodings pick the same classes (nvJPEG and
    libjpeg-turbo differ by a few grey levels at most, far from moving a top-1 on most images)."""
    imgs = good_images(fmnist_small, 40)
    got = {}
    for decode in ("auto", "cpu"):
        summ = tmp_path / f"{decode}.json"
        rc, lines, err = run_infer(capsys, engine_checkpoint, imgs, "--decode-on", decode, "--summary", str(summ))
        assert rc == 0, err
        s = json.loads(summ.read_text())
        assert (s["dali_device"], s["engine_device"]) == ("gpu" if decode == "auto" else "cpu", "cuda")
        got[decode] = [ln["topk"][0] for ln in lines]
    same = sum(a == b for a, b in zip(got["auto"], got["cpu"]))
    assert same >= 0.95 * len(imgs), (same, len(imgs))


def test_output_file_is_written_atomically(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    out = tmp_path / "preds" / "p.jsonl"
    folder = fmnist_small / "val" / "bag"
    rc, stdout_lines, _ = run_infer(capsys, engine_fp32_onnx, [folder], "--output", str(out))
    assert rc == 0 and stdout_lines == []
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(list(folder.glob("*.jpg")))
    assert all(
        ln["classes"][0]
        in ("bag", "ankle_boot", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top", "trouser")
        for ln in lines
    )
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]  # no temporary left behind


# --------------------------------------------------------------------------- bad inputs


def _jpeg_with_size(src: Path, dst: Path, w: int, h: int) -> Path:
    """A real JPEG whose SOF header claims w x h (a decompression bomb's header)."""
    b = bytearray(src.read_bytes())
    i = 2
    while i < len(b):
        assert b[i] == 0xFF
        marker, seg = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5 : i + 7] = h.to_bytes(2, "big")
            b[i + 7 : i + 9] = w.to_bytes(2, "big")
            break
        i += 2 + seg
    dst.write_bytes(bytes(b))
    return dst


def _corrupt_jpeg(src: Path, dst: Path) -> Path:
    """A real JPEG with garbage Huffman tables (:func:`tests.jpegs.bogus_huffman`)."""
    dst.write_bytes(bogus_huffman(src.read_bytes()))
    return dst


def _assert_pil_cannot_decode(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:  # the header reads fine...
        assert im.size == (512, 512)
        with pytest.raises(OSError):  # ...the data does not
            im.load()


def _make_bad(kind: str, d: Path, photos: dict[str, Path]) -> tuple[Path, str]:
    """Create one bad input in folder d; return (path, substring expected in its error)."""
    jpg = photos["jpeg"].read_bytes()
    if kind == "truncated":
        # cut inside the entropy-coded data: a third of the file, well past the header
        assert len(jpg) // 3 > jpeg_segments(jpg)[-1][1] + 100
        (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
        _assert_pil_cannot_decode(d / "truncated.jpg")
        return d / "truncated.jpg", "truncated JPEG file (it ends before its end-of-image marker)"
    if kind == "corrupt":
        _assert_pil_cannot_decode(_corrupt_jpeg(photos["jpeg"], d / "corrupt.jpg"))
        return d / "corrupt.jpg", "cannot decode image (OSError: broken data stream"
    if kind == "zero_bytes":
        (d / "empty.jpg").write_bytes(b"")
        return d / "empty.jpg", "empty file"
    if kind == "text_as_jpg":
        (d / "notes.jpg").write_text("this is a text file, not an image\n" * 20)
        return d / "notes.jpg", "not an image"
    if kind == "dangling_symlink":
        os.symlink(d / "does-not-exist.jpg", d / "link.jpg")
        return d / "link.jpg", "cannot read"
    if kind == "bomb_20000":
        return _jpeg_with_size(photos["jpeg"], d / "huge.jpg", 20000, 20000), "too large"
    if kind == "over_limit_120mp":
        return _jpeg_with_size(photos["jpeg"], d / "big.jpg", 12000, 10000), "too large"
    raise AssertionError(kind)


BAD_KINDS = ["truncated", "corrupt", "zero_bytes", "text_as_jpg", "dangling_symlink", "bomb_20000", "over_limit_120mp"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_is_isolated(capsys, tmp_path, kind, engine_fp32_onnx, fmnist_small, photos):
    d = tmp_path / "in"
    d.mkdir()
    good = good_images(fmnist_small, 5)
    for i, g in enumerate(good):  # names sort around the bad one so it sits inside a batch
        shutil.copy(g, d / f"{'a' if i < 2 else 'z'}{i}.jpg")
    bad, expect = _make_bad(kind, d, photos)
    rc, lines, err = run_infer(capsys, engine_fp32_onnx, [d], "--batch-size", "4")
    by_path = {ln["path"]: ln for ln in lines}
    assert rc == 1, err
    assert len(lines) == len(good) + 1
    assert expect in by_path[str(bad)]["error"], by_path[str(bad)]
    classified = [ln for p, ln in by_path.items() if p != str(bad)]
    assert len(classified) == len(good) and all("topk" in ln for ln in classified)


def test_unreadable_file(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root reading (covered by the dangling-symlink case)")
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(good_images(fmnist_small, 1)[0], d / "ok.jpg")
    shutil.copy(good_images(fmnist_small, 1)[0], d / "locked.jpg")
    os.chmod(d / "locked.jpg", 0)
    rc, lines, _ = run_infer(capsys, engine_fp32_onnx, [d])
    assert rc == 1 and "cannot read" in lines[0]["error"] and "topk" in lines[1]


# --------------------------------------------------------------------------- usage / engine errors


def _expect_exit2(capsys, argv: list[str], needle: str) -> None:
    rc = infer.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and needle in err, err


def test_missing_engine(capsys, tmp_path, fmnist_small):
    _expect_exit2(capsys, ["--engine", str(tmp_path / "nope.onnx"), str(fmnist_small)], "engine not found")


def test_missing_manifest(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    eng = tmp_path / "copy.onnx"
    shutil.copy(engine_fp32_onnx, eng)
    _expect_exit2(capsys, ["--engine", str(eng), str(fmnist_small)], "manifest not found")


def test_manifest_kind_mismatch(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    eng = tmp_path / "m.onnx"
    shutil.copy(engine_fp32_onnx, eng)
    m = json.loads(Path(str(engine_fp32_onnx) + ".manifest.json").read_text())
    m["kind"] = "checkpoint"
    Path(str(eng) + ".manifest.json").write_text(json.dumps(m))
    _expect_exit2(capsys, ["--engine", str(eng), str(fmnist_small)], "'checkpoint' artifact")


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_pt2", "engine_checkpoint"])
def test_manifest_class_count_mismatch(request, capsys, copy_engine, engine_fixture, fmnist_small):
    """ONNX records the output width (10) statically; the .pt2's comes from its load-time probe.
    A checkpoint carries its manifest inside too, which the file beside it must equal."""
    engine = request.getfixturevalue(engine_fixture)
    eng = copy_engine(engine, lambda m: m.update(classes=m["classes"][:3]))
    rc = infer.main(["--engine", str(eng), str(fmnist_small / "val"), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    if engine_fixture == "engine_checkpoint":
        assert error_line(cap.err).startswith(
            f"error: {eng}: the manifest beside it ({eng.name}.manifest.json) and the one inside the checkpoint "
            "differ in 'classes'"
        )
    else:
        assert error_line(cap.err) == f"error: {eng}: the engine outputs 10 classes but its manifest lists 3"
    assert cap.out == ""


@pytest.mark.parametrize("size", [24, 64])
@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_int8_onnx", "engine_pt2"])
def test_manifest_image_size_mismatch(
    request, capsys, tmp_path, copy_engine, set_image_size, engine_fixture, size, fmnist_small
):
    """The export makes only the batch dynamic: the engine takes one H x W. A manifest with
    another image_size is refused when the engine is loaded (exit 2, nothing classified), not by
    an ONNX Runtime traceback (exit 1) or, for a .pt2, with silently wrong logits from a package
    that reads a 64 px image as if it were 32 px (or out of bounds for 24 px)."""
    engine = request.getfixturevalue(engine_fixture)
    trained = json.loads(Path(str(engine) + ".manifest.json").read_text())["image_size"]
    assert trained == 32 and size != trained
    eng = copy_engine(engine, lambda m: set_image_size(m, size))
    out = tmp_path / "preds.jsonl"
    rc = infer.main(["--engine", str(eng), str(fmnist_small / "val" / "bag"), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert error_line(cap.err).startswith(image_size_refusal(eng, size)), cap.err
    assert cap.out == ""  # no output line: refused before any image was decoded
    rc = infer.main(["--engine", str(eng), str(fmnist_small / "val" / "bag"), "--quiet", "--output", str(out)])
    assert rc == 2 and not out.exists() and list(tmp_path.glob("preds*")) == []
    capsys.readouterr()


def test_checkpoint_engine_errors(capsys, copy_engine, engine_checkpoint, engine_fp32_onnx, fmnist_small):
    """A .pt that is not a readable checkpoint, or whose manifest is not a checkpoint's: exit 2."""
    # the manifest's sha256 record dropped (as a manifest from before it had one): what is tested
    # here is the checkpoint's own reading, which the record would otherwise refuse first
    bad = copy_engine(engine_checkpoint, lambda m: m.pop("artifact"))
    bad.write_bytes(bad.read_bytes()[:4096])  # truncated
    _expect_exit2(
        capsys,
        ["--engine", str(bad), str(fmnist_small / "val" / "bag")],
        "not a readable checkpoint (truncated or corrupt?)",
    )
    onnx_as_pt = bad.parent / "onnx-renamed.pt"
    shutil.copy(engine_fp32_onnx, onnx_as_pt)
    shutil.copy(str(engine_fp32_onnx) + ".manifest.json", str(onnx_as_pt) + ".manifest.json")
    _expect_exit2(capsys, ["--engine", str(onnx_as_pt), str(fmnist_small / "val" / "bag")], "'onnx' artifact")


def test_manifest_image_size_inconsistent(capsys, copy_engine, engine_fp32_onnx, fmnist_small):
    """image_size at the top of the manifest and its preprocessing's disagree: refused too."""
    eng = copy_engine(engine_fp32_onnx, lambda m: m.update(image_size=64))
    _expect_exit2(
        capsys,
        ["--engine", str(eng), str(fmnist_small / "val" / "bag")],
        "manifest is inconsistent: image_size 64 but its preprocessing crops 32 px",
    )


def test_no_inputs(capsys, tmp_path, engine_fp32_onnx):
    _expect_exit2(capsys, ["--engine", str(engine_fp32_onnx)], "no input images")
    (tmp_path / "empty").mkdir()
    _expect_exit2(capsys, ["--engine", str(engine_fp32_onnx), str(tmp_path / "empty")], "no image files found")
    gone = [str(tmp_path / f"gone{i}.jpg") for i in range(7)]
    _expect_exit2(
        capsys, ["--engine", str(engine_fp32_onnx), *gone], f"no such file or folder: {', '.join(gone[:5])} ..."
    )


def test_plan_without_tensorrt_is_a_clear_error(capsys, tmp_path, engine_fp32_onnx, fmnist_small):
    from rn50.backends.tensorrt import _import_trt

    try:
        _import_trt()
        import torch

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: covered by the tensorrt tests")
    except Exception:
        pass
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"not a plan")
    m = json.loads(Path(str(engine_fp32_onnx) + ".manifest.json").read_text())
    m["kind"] = "tensorrt"
    del m["artifact"]  # it is the ONNX's sha256: this tests the plan's own loading, not that record
    Path(str(plan) + ".manifest.json").write_text(json.dumps(m))
    rc = infer.main(["--engine", str(plan), str(fmnist_small)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and ("TensorRT" in err or "GPU" in err), err


def test_files_from_a_list_or_stdin(capsys, tmp_path, monkeypatch, engine_fp32_onnx, fmnist_small):
    """For more files than a command line holds (find ... | serve.infer --files-from -)."""
    import io
    import sys

    imgs = good_images(fmnist_small, 3)
    spaced = tmp_path / " a name with spaces .jpg"
    shutil.copy(imgs[2], spaced)
    listing = f"{imgs[0]}\n\n{imgs[1]}\r\n{spaced}\n"
    (tmp_path / "list.txt").write_text(listing)
    rc, lines, _ = run_infer(capsys, engine_fp32_onnx, [imgs[2]], "--files-from", str(tmp_path / "list.txt"))
    assert rc == 0 and [ln["path"] for ln in lines] == [str(imgs[2]), str(imgs[0]), str(imgs[1]), str(spaced)]
    assert lines[0]["topk"] == lines[3]["topk"]  # the same image under a name with spaces
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(listing.encode())))
    rc, lines, _ = run_infer(capsys, engine_fp32_onnx, [], "--files-from", "-")
    assert rc == 0 and [ln["path"] for ln in lines] == [str(imgs[0]), str(imgs[1]), str(spaced)]
    for source, why in ((tmp_path / "nope.txt", "cannot read it"), (tmp_path / "empty.txt", "lists no paths")):
        (tmp_path / "empty.txt").write_text("\n")
        assert infer.main(["--engine", str(engine_fp32_onnx), "--files-from", str(source)]) == 2
        assert error_line(capsys.readouterr().err) == f"error: --files-from {source}: " + (
            "cannot read it (No such file or directory)" if why == "cannot read it" else why
        )


@pytest.mark.parametrize(
    "spoil, named",
    [
        (
            lambda m: m["parity"].update(passed=False, problem="top-1 agreement 35.70 % < 99 %"),
            "the parity check (top-1",
        ),
        (lambda m: m["int8"]["gate"].update(passed=False), "the INT8 accuracy gate (failed)"),
    ],
    ids=["parity", "int8-gate"],
)
def test_an_engine_forced_past_a_failed_export_check_is_served_with_a_warning(
    spoil, named, capsys, copy_engine, engine_int8_onnx, fmnist_small
):
    """export --force writes an engine that failed its checks; its manifest says so, and whatever
    serves it says so too, once, before the predictions (which still come)."""
    eng = copy_engine(engine_int8_onnx, spoil)
    rc, lines, err = run_infer(capsys, eng, good_images(fmnist_small, 2))
    assert rc == 0 and len(lines) == 2, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {eng}: exported although it failed "), err
    assert named in warnings[0] and "--force" in warnings[0], warnings[0]
    # the engine as exported, checks passed: no warning
    rc, lines, err = run_infer(capsys, engine_int8_onnx, good_images(fmnist_small, 2))
    assert rc == 0 and "warning:" not in err, err


def test_quiet_pt2_on_a_cpu_prints_nothing_but_predictions(engine_pt2, fmnist_small):
    """--quiet: stderr stays empty with a .pt2 on a machine without CUDA (torch's cpp_extension
    logs a CUDA_HOME notice on import, which a CPU package never needs)."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("the notice is only logged without a CUDA runtime")
    root = Path(__file__).resolve().parents[2]
    img = good_images(fmnist_small, 1)[0]
    out = subprocess.run(
        [sys.executable, "-m", "serve.infer", "--engine", str(engine_pt2), str(img), "--quiet"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and json.loads(out.stdout)["path"] == str(img), out.stderr
