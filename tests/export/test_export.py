"""`python -m export`: ONNX parity, dynamic batch, FP16, AOTInductor, TensorRT, manifests, bad inputs.

The engines come from the shared session fixtures in tests/conftest.py (built once with
``export.main`` from the small trained model), so these tests add little build time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from export import tensorrt_engine as te
from rn50.batches import iter_split
from rn50.checkpoint import load_model, save_checkpoint
from rn50.layout import balanced_subset, load_dataset
from rn50.manifest import new_manifest, read_manifest, sha256_file
from rn50.model import build_model
from rn50.preprocess import Preprocessing
from tests.killed import killed_renaming

CLASSES = [f"c{i}" for i in range(10)]


def _val_batch(data: Path, n: int, p: Preprocessing) -> np.ndarray:
    _, val = load_dataset(data)
    f, y = balanced_subset(val.files, val.labels, n, seed=1)
    x, _ = next(iter_split(f[:n], y[:n], p, batch_size=n))
    return x


def _leftovers(folder: Path, allowed: set[str] = frozenset()) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in allowed)


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_parity_and_manifest(engine_fp32_onnx: Path, trained_run: Path) -> None:
    import onnx

    onnx.checker.check_model(str(engine_fp32_onnx))
    m = read_manifest(engine_fp32_onnx)  # validates the round trip
    ck = read_manifest(trained_run / "best.pt")
    assert m["kind"] == "onnx" and m["precision"] == "fp32"
    assert m["classes"] == ck["classes"] and m["preprocessing"] == ck["preprocessing"]
    assert m["source"]["sha256"] == sha256_file(trained_run / "best.pt")
    assert m["artifact"] == {"sha256": sha256_file(engine_fp32_onnx)}
    par = m["parity"]
    assert par["passed"] and par["images"] >= 200
    assert par["max_abs_logit_diff"] <= 1e-3 * max(1.0, par["max_abs_logit"])
    assert par["top1_agreement"] >= 99.5
    assert 0 <= m["accuracy"]["top1"] <= m["accuracy"]["top5"] <= 100
    g = onnx.load(str(engine_fp32_onnx), load_external_data=False).graph
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["logits"]
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("engine_fixture", ["engine_fp32_onnx", "engine_int8_onnx"])
def test_onnx_carries_classes_and_preprocessing_in_its_metadata(request, engine_fixture: str) -> None:
    """The bare .onnx says how to read it (ONNX Runtime's custom_metadata_map), as its manifest does."""
    from rn50.manifest import read_manifest
    from rn50.ort import session

    engine = request.getfixturevalue(engine_fixture)
    meta = session(str(engine)).get_modelmeta().custom_metadata_map
    m = read_manifest(engine)
    assert json.loads(meta["rn50.classes"]) == m["classes"]
    assert json.loads(meta["rn50.preprocessing"]) == m["preprocessing"]
    assert meta["rn50.precision"] == m["precision"]


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_onnx_dynamic_batch_matches_pytorch(
    engine_fp32_onnx: Path, trained_run: Path, fmnist_small: Path, batch: int
) -> None:
    from rn50.ort import session

    model, man = load_model(trained_run / "best.pt")
    p = Preprocessing.from_dict(man["preprocessing"])
    x = _val_batch(fmnist_small, batch, p)
    assert x.shape == (batch, 3, p.image_size, p.image_size)
    s = session(engine_fp32_onnx, prefer_gpu=False)
    got = s.run(None, {"input": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (batch, len(man["classes"]))
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_polygraphy_runs_the_onnx_on_real_images(engine_fp32_onnx: Path, trained_run: Path, tmp_path: Path) -> None:
    """`polygraphy run --onnxrt` with export/polygraphy_inputs.py: the same command compares a
    TensorRT engine (`--trt`) where TensorRT exists. Its outputs must be PyTorch's on the same
    real, preprocessed validation images."""
    import subprocess
    import sys

    from polygraphy.comparator import RunResults

    root = Path(__file__).resolve().parents[2]
    out, inputs = tmp_path / "outputs.json", tmp_path / "inputs.json"
    env = {
        **os.environ,
        "RN50_MODEL": str(engine_fp32_onnx),
        "RN50_BATCHES": "2",
        "RN50_BATCH_SIZE": "8",
        "POLYGRAPHY_AUTOINSTALL_DEPS": "0",
    }
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "polygraphy"),
            "run",
            str(engine_fp32_onnx),
            "--onnxrt",
            "--data-loader-script",
            str(root / "export" / "polygraphy_inputs.py"),
            "--save-inputs",
            str(inputs),
            "--save-outputs",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    from polygraphy.json import load_json

    feeds = load_json(str(inputs))
    ((_, runs),) = RunResults.load(str(out)).items()
    assert len(feeds) == len(runs) == 2
    model, _ = load_model(trained_run / "best.pt")
    for feed, outs in zip(feeds, runs):
        x = feed["input"]
        assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32 and x.std() > 0.1  # real images, normalised
        with torch.no_grad():
            ref = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        got = outs["logits"]
        assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_fp16_onnx(tmp_path: Path, trained_run: Path) -> None:
    import onnx

    out = tmp_path / "rn50.fp16.onnx"
    assert (
        export.main(
            [
                "--checkpoint",
                str(trained_run / "best.pt"),
                "--precision",
                "fp16",
                "--output",
                str(out),
                "--parity-images",
                "32",
            ]
        )
        == 0
    )
    g = onnx.load(str(out)).graph
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert g.input[0].type.tensor_type.elem_type == f32 and g.output[0].type.tensor_type.elem_type == f32
    conv_w = {n.input[1] for n in g.node if n.op_type == "Conv"}
    assert conv_w and all(i.data_type == f16 for i in g.initializer if i.name in conv_w)
    m = read_manifest(out)
    assert m["precision"] == "fp16" and m["parity"]["passed"] and m["parity"]["top1_agreement"] >= 99.0
    assert m["artifact"]["sha256"] == sha256_file(out)
    assert _leftovers(tmp_path) == ["rn50.fp16.onnx", "rn50.fp16.onnx.manifest.json"]


def _onnx_precision(path: Path) -> str:
    """fp16 when the model's convolution weights are stored in fp16, else fp32."""
    import onnx

    g = onnx.load(str(path)).graph
    return "fp16" if any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer) else "fp32"


def test_onnx_replaced_behind_its_manifest_is_refused(engine_fp32_onnx: Path, tmp_path: Path) -> None:
    """Another model copied over the ONNX keeps the ONNX's manifest: loading refuses the pair,
    naming the file, instead of serving the other model as what the manifest describes."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from rn50.backends import load_engine
    from rn50.errors import ManifestError
    from rn50.manifest import manifest_path

    eng = tmp_path / engine_fp32_onnx.name
    shutil.copy(engine_fp32_onnx, eng)
    shutil.copy(manifest_path(engine_fp32_onnx), manifest_path(eng))
    assert load_engine(eng, prefer_gpu=False)[1]["precision"] == "fp32"
    model = onnx.load(str(eng))
    w = model.graph.initializer[-1]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    onnx.save(model, str(eng))
    with pytest.raises(ManifestError) as e:
        load_engine(eng, prefer_gpu=False)
    want = json.loads(manifest_path(eng).read_text())["artifact"]["sha256"]  # read_manifest refuses the pair
    assert str(e.value) == (
        f"{eng} does not match its manifest: the manifest describes a file with sha256 {want[:12]}…, "
        f"this file has {sha256_file(eng)[:12]}…; re-export it or restore the matching manifest"
    )


@pytest.mark.parametrize("dies_at", ["manifest", "model"])
def test_export_killed_between_model_and_manifest_is_detectable(
    engine_fp32_onnx: Path, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: str
) -> None:
    """An fp16 export over an fp32 ONNX, killed as it renames the manifest or the model into
    place: afterwards loading either gets a model with the manifest written for it, or refuses the
    pair; never the fp16 model under the fp32 manifest (or the reverse) unnoticed."""
    import shutil

    from rn50.backends import load_engine
    from rn50.errors import ManifestError
    from rn50.manifest import manifest_path

    out = tmp_path / "rn50.onnx"
    shutil.copy(engine_fp32_onnx, out)
    shutil.copy(manifest_path(engine_fp32_onnx), manifest_path(out))
    target = manifest_path(out) if dies_at == "manifest" else out
    with killed_renaming(monkeypatch, target):
        export.main(_args(trained_run / "best.pt", "fp16", out) + ["--parity-images", "32"])
    try:
        _, m = load_engine(out, prefer_gpu=False)
    except ManifestError as e:
        assert "does not match its manifest" in str(e)
    else:
        assert m["precision"] == _onnx_precision(out)
    assert _leftovers(tmp_path) == ["rn50.onnx", "rn50.onnx.manifest.json"]


# ------------------------------------------------------------------------------------------ AOTInductor


def test_pt2_loads_and_matches_pytorch(engine_pt2: Path, trained_run: Path, fmnist_small: Path) -> None:
    from torch._inductor import aoti_load_package

    m = read_manifest(engine_pt2)
    assert m["kind"] == "aoti" and m["parity"]["passed"] and m["max_batch"] >= 32
    assert m["artifact"]["sha256"] == sha256_file(engine_pt2)
    model, man = load_model(trained_run / "best.pt")
    p = Preprocessing.from_dict(man["preprocessing"])
    pkg = aoti_load_package(str(engine_pt2))
    for b in (1, 7):
        x = _val_batch(fmnist_small, b, p)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
            got = pkg(torch.from_numpy(x))
        got = (got[0] if isinstance(got, (list, tuple)) else got).numpy()
        assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------ TensorRT


def test_plan_without_tensorrt_writes_onnx_and_explains(
    tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if te.missing() is None:
        pytest.skip("TensorRT and a GPU are present: the real build is tested in test_tensorrt_engine")
    out = tmp_path / "rn50.fp32.plan"
    rc = export.main(
        [
            "--checkpoint",
            str(trained_run / "best.pt"),
            "--precision",
            "fp32",
            "--output",
            str(out),
            "--parity-images",
            "40",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("TensorRT" in last or "GPU" in last)
    assert "serve.infer --engine" in last and str(tmp_path / "rn50.fp32.onnx") in last
    assert _leftovers(tmp_path) == ["rn50.fp32.onnx", "rn50.fp32.onnx.manifest.json"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine(tmp_path: Path, trained_run: Path, fmnist_small: Path, precision: str) -> None:
    why = te.missing()
    if why:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {why}")
    out = tmp_path / f"rn50.{precision}.plan"
    cache = tmp_path / "timing.cache"
    args = [
        "--checkpoint",
        str(trained_run / "best.pt"),
        "--precision",
        precision,
        "--output",
        str(out),
        "--timing-cache",
        str(cache),
        "--batch-max",
        "64",
        "--parity-images",
        "64",
        "--calib-size",
        "128",
    ]
    assert export.main(args) == 0
    assert out.is_file() and cache.is_file() and (tmp_path / f"rn50.{precision}.onnx").is_file()
    m = read_manifest(out)
    assert m["kind"] == "tensorrt" and m["tensorrt_version"] == te.version() and m["gpu"]["compute_capability"]
    assert m["onnx_source"]["sha256"] == sha256_file(tmp_path / f"rn50.{precision}.onnx")
    assert m["artifact"]["sha256"] == sha256_file(out)
    model, man = load_model(trained_run / "best.pt")
    p = Preprocessing.from_dict(man["preprocessing"])
    from rn50.backends import load_engine

    backend, _ = load_engine(out)
    run = backend.run
    for b in (1, 7, 32):
        x = _val_batch(fmnist_small, b, p)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = run(x)
        assert got.shape == ref.shape
        assert (got.argmax(1) == ref.argmax(1)).mean() >= (0.85 if precision == "int8" else 0.95)


def _mypy(*files: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict with the repository's configuration (pyproject.toml: typings/ stubs), as `make typecheck`."""
    import subprocess
    import sys

    root = Path(export.__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(root / "pyproject.toml"), *map(str, files)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


# Misuses of the TensorRT calls the two modules make, one per line of misuse's body, each of
# which mypy must report: results and parameters the stubs type as bool or as a buffer
# (typing_extensions.Buffer). An annotation in the stubs that names no type is read as Any, and
# then every one of these lines passes.
_MISUSES = """\
from pathlib import Path

import tensorrt as trt


def misuse(
    parser: trt.OnnxParser,
    config: trt.IBuilderConfig,
    cache: trt.ITimingCache,
    runtime: trt.Runtime,
    context: trt.IExecutionContext,
) -> None:
    a: str = context.execute_async_v3(0)
    b: str = context.set_input_shape("input", (1, 3, 32, 32))
    c: str = context.set_tensor_address("input", 0)
    d: str = parser.parse(b"", "model.onnx")
    config.set_timing_cache(cache, "not a bool")
    config.create_timing_cache("timing.cache")
    parser.parse(Path("model.onnx"), "model.onnx")
    runtime.deserialize_cuda_engine(Path("model.plan"))
"""


def test_tensorrt_modules_typecheck_and_a_misspelled_attribute_fails(tmp_path: Path) -> None:
    """mypy reads the TensorRT stubs (typings/): the real modules pass, and a scratch copy of the
    builder with a misspelled ``trt.BuilderFlag`` member fails, so the check can fail; so does
    each line of :data:`_MISUSES`, so the stubs' bool and buffer types are real types."""
    root = Path(export.__file__).resolve().parents[1]
    ok = _mypy(root / "export" / "tensorrt_engine.py", root / "rn50" / "backends" / "tensorrt.py")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    src = (root / "export" / "tensorrt_engine.py").read_text()
    bad = tmp_path / "tensorrt_engine_typo.py"
    bad.write_text(src + "\n\nTYPO = trt.BuilderFlag.TF23\n")
    misuse = tmp_path / "tensorrt_misuse.py"
    misuse.write_text(_MISUSES)
    r = _mypy(bad, misuse)
    assert r.returncode == 1 and 'BuilderFlag]" has no attribute "TF23"' in r.stdout, r.stdout + r.stderr
    lines = _MISUSES.splitlines()
    expected = set(range(lines.index(") -> None:") + 2, len(lines) + 1))
    flagged = {int(n) for n in re.findall(rf"^\S*{re.escape(misuse.name)}:(\d+): error:", r.stdout, re.M)}
    assert flagged == expected, (
        f"mypy accepts {[lines[i - 1].strip() for i in sorted(expected - flagged)]}; "
        f"flags unexpected lines {sorted(flagged - expected)}\n{r.stdout}"
    )


def test_pt2_load_check_runs_the_package_in_a_child(engine_pt2: Path, tmp_path: Path) -> None:
    from export.aoti import check_loads
    from rn50.errors import EngineError

    check_loads(engine_pt2, "cpu", read_manifest(engine_pt2)["preprocessing"]["image_size"])  # loads and runs
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(EngineError, match="cannot load the package it has just compiled"):
        check_loads(junk, "cpu", 32)


def test_pt2_export_survives_a_loader_crash(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AOTInductor's CUDA loader can die of SIGSEGV instead of raising: here a child that dies
    of SIGSEGV stands in for it. The export must say so, exit 2 and leave nothing behind."""
    import export.aoti

    monkeypatch.setattr(export.aoti, "_LOAD_CHECK", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    (tmp_path / "out").mkdir()
    _bad(tmp_path, capsys, _args(trained_run / "best.pt", "fp32", tmp_path / "out" / "m.pt2"), "crashed (SIGSEGV)")


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained but valid checkpoint (argument checks never run the network)."""
    d = tmp_path_factory.mktemp("ck")
    p = Preprocessing.for_image_size(32)
    return save_checkpoint(
        d / "ck.pt",
        build_model(10).state_dict(),
        new_manifest("checkpoint", classes=CLASSES, preprocessing=p, precision="fp32"),
    )


def _args(checkpoint: Path, precision: str, output: Path) -> list[str]:
    """The flags every export run needs."""
    return ["--checkpoint", str(checkpoint), "--precision", precision, "--output", str(output)]


def _bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str, out_dir: Path | None = None
) -> None:
    out_dir = out_dir or tmp_path / "out"
    before = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    rc = export.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("error: ") and needle in err[-1], err
    after = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    assert after == before, f"left behind: {sorted(after - before)}"


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _bad(tmp_path, capsys, _args(tmp_path / "nope.pt", "fp32", tmp_path / "out" / "m.onnx"), "not found")


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    (tmp_path / "out").mkdir()
    _bad(tmp_path, capsys, _args(bad, "fp32", tmp_path / "out" / "m.onnx"), "corrupt")


def test_classifier_size_differs_from_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = Preprocessing.for_image_size(32)
    ck = save_checkpoint(
        tmp_path / "ck3.pt",
        build_model(3).state_dict(),
        new_manifest("checkpoint", classes=CLASSES, preprocessing=p, precision="fp32"),
    )
    (tmp_path / "out").mkdir()
    _bad(tmp_path, capsys, _args(ck, "fp32", tmp_path / "out" / "m.pt2"), "3 outputs")


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path) -> None:
    blocker = tmp_path / "out" / "file"
    blocker.parent.mkdir()
    blocker.write_text("a file, not a folder")
    _bad(tmp_path, capsys, _args(tiny_ckpt, "fp32", blocker / "m.onnx"), "is not a folder")
    os.mkfifo(blocker.parent / "pipe.onnx")  # renamed onto, a pipe (or, as root, /dev/null) is replaced
    _bad(tmp_path, capsys, _args(tiny_ckpt, "fp32", blocker.parent / "pipe.onnx"), "is a device, pipe or socket")
    if os.geteuid() != 0:  # root writes anywhere; the permission case only means something for users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _bad(
            tmp_path,
            capsys,
            _args(tiny_ckpt, "fp32", ro / "m.onnx"),
            "not writable",
            out_dir=ro,
        )


@pytest.mark.parametrize(
    "precision,name,needle",
    [
        ("fp64", "m.onnx", "--precision"),
        ("fp32", "m.tflite", "unknown suffix"),
        ("fp32", "m", "unknown suffix"),
        ("int8", "m.pt2", "not available for .pt2"),
    ],
)
def test_bad_precision_or_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path, precision: str, name: str, needle: str
) -> None:
    (tmp_path / "out").mkdir()
    _bad(tmp_path, capsys, _args(tiny_ckpt, precision, tmp_path / "out" / name), needle)


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path) -> None:
    (tmp_path / "out").mkdir()
    base = _args(tiny_ckpt, "int8", tmp_path / "out" / "m.plan")
    _bad(tmp_path, capsys, base + ["--calib-method", "magic"], "--calib-method")
    _bad(tmp_path, capsys, base + ["--int8-flavour", "u4"], "--int8-flavour")
    # TensorRT rejects non-zero zero points: u8s8 has them
    _bad(tmp_path, capsys, base + ["--int8-flavour", "u8s8"], "u8s8 cannot go into a .plan")
    _bad(tmp_path, capsys, base + ["--hardware-compat", "any"], "--hardware-compat")
    _bad(tmp_path, capsys, base + ["--batch-min", "8", "--batch-opt", "4"], "batch profile")
    _bad(tmp_path, capsys, base + ["--no-such-flag"], "unrecognized")


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path) -> None:
    (tmp_path / "out").mkdir()
    _bad(
        tmp_path,
        capsys,
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--precision",
            "fp32",
            "--output",
            str(tmp_path / "out" / "m.onnx"),
            "--data",
            str(tmp_path / "nodata"),
        ],
        "not found",
    )


def test_help() -> None:
    assert export.main(["--help"]) == 0


def test_the_recorded_data_folder_is_named_when_it_is_gone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Older checkpoints recorded the data folder as given (relative to where train ran): export
    run elsewhere says where the path came from instead of a bare "not found"."""
    ck = save_checkpoint(
        tmp_path / "ck.pt",
        build_model(10).state_dict(),
        new_manifest(
            "checkpoint",
            classes=CLASSES,
            preprocessing=Preprocessing.for_image_size(32),
            precision="fp32",
            train_config={"data": "data/moved-away"},
        ),
    )
    (tmp_path / "out").mkdir()
    _bad(tmp_path, capsys, _args(ck, "fp32", tmp_path / "out" / "m.onnx"), f"recorded in {ck}'s manifest is not there")


def test_a_gate_too_coarse_for_its_bound_is_warned_about() -> None:
    """On a small validation split the gate shrinks to what there is; when one image is more than
    the allowed drop, the gate judges single images, and the warning (and the refusal's hint) say so."""
    from export.__main__ import _coarse_gate

    small = _coarse_gate(15, 2000, 0.5)
    assert small is not None and small.startswith("the INT8 gate runs on the 15 validation images there are")
    assert "one image is 6.7 points of top-1, more than the 0.5 allowed" in small
    assert _coarse_gate(100, 100, 0.5) is not None  # asked for: still coarse
    assert _coarse_gate(500, 2000, 0.5) is None  # 0.2 points an image: fine
    assert _coarse_gate(200, 200, 0.5) is None  # exactly the bound
