"""INT8: calibration set, Q/DQ structure, the accuracy gate, --force, and the calibration cache."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

import export
from calibration.dataset import calibration_set
from calibration.gate import score
from rn50.layout import load_dataset
from rn50.manifest import preprocessing_of, read_manifest


def _init(g):  # name -> numpy array of the initializers
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in g.initializer}


def _qdq_checks(path: Path, flavour: str) -> None:
    import onnx

    g = onnx.load(str(path)).graph
    inits = _init(g)
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 54  # 53 convolutions + the classifier of ResNet50
    for n in convs:
        for i in n.input[:2]:  # activation and weight both come through DequantizeLinear
            dq = producer.get(i)
            assert dq is not None and dq.op_type == "DequantizeLinear", f"{n.name}: input {i} is not dequantized"
        wdq = producer[n.input[1]]
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        scale = inits[wdq.input[1]]
        w_q = inits[wdq.input[0]]
        assert w_q.dtype == np.int8
        assert scale.ndim == 1 and scale.shape[0] == w_q.shape[0] > 1 and axis == 0, (
            f"{n.name}: weights not per-channel"
        )
        assert not inits[wdq.input[2]].any(), f"{n.name}: weight zero point not 0"
    act = np.int8 if flavour == "s8s8" else np.uint8
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            zp = inits[n.input[2]]
            if zp.ndim == 0:  # per-tensor: activations
                assert zp.dtype == act
                if flavour == "s8s8":
                    assert zp == 0, f"{n.name}: activation zero point {zp} (TensorRT needs 0)"


def test_calibration_set_is_deterministic_balanced_and_from_train(fmnist_small: Path) -> None:
    train, val = load_dataset(fmnist_small)
    a = calibration_set(train.files, train.labels, 100)
    assert a == calibration_set(train.files, train.labels, 100)
    assert len(a) == 100 and len(set(a)) == 100
    lab = dict(zip(train.files, train.labels))
    assert set(collections.Counter(lab[f] for f in a).values()) == {10}
    assert not set(a) & set(val.files)


def test_u8s8_qdq_structure_and_accuracy(engine_int8_onnx: Path, engine_fp32_onnx: Path, fmnist_small: Path) -> None:
    m = read_manifest(engine_int8_onnx)
    assert m["precision"] == "int8" and m["int8_flavour"] == "u8s8"
    assert m["int8"]["gate"]["passed"] and m["int8"]["method"] == "percentile"
    _qdq_checks(engine_int8_onnx, "u8s8")
    # independent re-measure on the whole small validation split (500 images)
    _, val = load_dataset(fmnist_small)
    r = score({"fp32": engine_fp32_onnx, "int8": engine_int8_onnx}, val.files, val.labels, preprocessing_of(m))
    assert r["fp32"]["top1"] > 30, "the shared test model should be well above chance"
    assert r["fp32"]["top1"] - r["int8"]["top1"] <= 0.5


def s8s8_args(trained_run: Path) -> list[str]:
    """The s8s8 export's settings but its output: the cache test repeats them to hit the cached calibration."""
    return [
        "--checkpoint",
        str(trained_run / "best.pt"),
        "--precision",
        "int8",
        "--int8-flavour",
        "s8s8",
        "--calib-size",
        "128",
        "--calib-method",
        "minmax",
        "--parity-images",
        "64",
    ]


@pytest.fixture(scope="module")
def s8s8(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Path:
    out = tmp_path_factory.mktemp("s8s8") / "rn50.int8.s8s8.onnx"
    rc = export.main(s8s8_args(trained_run) + ["--output", str(out), "--force"])
    assert rc == 0
    return out


def test_s8s8_qdq_structure_for_tensorrt(s8s8: Path) -> None:
    m = read_manifest(s8s8)
    assert m["int8_flavour"] == "s8s8" and m["int8"]["method"] == "minmax" and m["int8"]["calibration_images"] == 128
    _qdq_checks(s8s8, "s8s8")


def _check_tensorrt_rules(path: Path) -> None:
    """The Q/DQ model a .plan is built from, checked rule by rule.

    Sources: [TRT-QT] TensorRT developer guide, "Working with Quantized Types"
    (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html);
    [OTRT] onnx-tensorrt docs/operators.md (QuantizeLinear/DequantizeLinear rows);
    [MO] NVIDIA ModelOpt modelopt/onnx/quantization/ort_utils.py configure_ort and graph_utils.py
    build_non_residual_input_map / remove_partial_input_qdq."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    g = model.graph
    inits = _init(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in g.node}
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert q and dq

    # [TRT-QT] per-channel weights are DequantizeLinear's "axis", which ONNX has from opset 13
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13, f"default-domain opset {opset}: no per-axis DequantizeLinear before 13"

    # [TRT-QT] "symmetric quantization", INT8 data type; [OTRT] zero points must be 0: every
    # zero point of every Q/DQ node is an int8 zero.
    for n in q + dq:
        assert len(n.input) == 3 and n.input[2] in inits, f"{n.name}: no zero point initializer"
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point {zp} ({zp.dtype})"

    # [TRT-QT] "All scale coefficients must have strictly positive values"; activations are
    # quantized per tensor: one scale (a scalar). Weights are stored quantized (int8
    # initializers), so any Q/DQ whose input is computed in the graph is an activation's.
    for n in q + dq:
        scale = inits[n.input[1]]
        assert (scale > 0).all(), f"{n.name}: scale {scale.min()} is not strictly positive"
        if n.input[0] not in inits:
            assert scale.ndim == 0, f"{n.name}: activation scale of shape {scale.shape}, not per tensor"

    # [OTRT] / onnx-tensorrt#850: TensorRT's dequantize takes 8-bit (or narrower) inputs only, so
    # no DequantizeLinear of an INT32 bias; [MO] QuantizeBias False: Conv/Gemm biases stay float.
    for n in dq:
        x = n.input[0]
        if x in inits:
            assert inits[x].dtype == np.int8, f"{n.name}: dequantizes a {inits[x].dtype} tensor"
    weighted = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 54
    for n in weighted:
        if len(n.input) > 2 and n.input[2]:
            b = n.input[2]
            assert b in inits and inits[b].dtype == np.float32, f"{n.name}: bias {b} is not a float initializer"

    # [TRT-QT] Q/DQ placement: quantize the inputs of weighted layers (activation and weights),
    # weights per output channel (Conv weights [K, C, R, S]: axis 0; Gemm with transB=1, the
    # exported Linear [out, in]: axis 0) [MO QDQOpTypePerChannelSupportToAxis].
    for n in weighted:
        for i in n.input[:2]:
            assert producer.get(i) is not None and producer[i].op_type == "DequantizeLinear", f"{n.name}: {i}"
        wdq = producer[n.input[1]]
        w = inits[wdq.input[0]]
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        if n.op_type == "Gemm":
            assert next((a.i for a in n.attribute if a.name == "transB"), 0) == 1
        assert axis == 0 and inits[wdq.input[1]].shape == (w.shape[0],), f"{n.name}: weights not per output channel"

    # [TRT-QT] Q/DQ placement; [MO] op_types_to_quantize Conv, Gemm, Add: a DequantizeLinear
    # feeds only the layers that read int8 (Conv, Gemm, the residual Add), each QuantizeLinear
    # only its DequantizeLinear. TensorRT moves Q/DQ across MaxPool, Relu, GlobalAveragePool
    # and Flatten itself.
    for n in dq:
        kinds = {c.op_type for c in consumers.get(n.output[0], [])}
        assert kinds and kinds <= {"Conv", "Gemm", "Add"}, f"{n.name} feeds {sorted(kinds)}"
    for n in q:
        kinds = {c.op_type for c in consumers.get(n.output[0], [])}
        assert kinds == {"DequantizeLinear"}, f"{n.name} feeds {sorted(kinds)}"

    # [MO] no output quantization (OpTypesToExcludeOutputQuantization); so nothing quantizes the
    # logits: the graph output comes straight from the classifier's Gemm, and no Q/DQ follows a
    # Gemm or an Add.
    out = g.output[0]
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert producer[out.name].op_type == "Gemm"
    for n in g.node:
        if n.op_type in ("Gemm", "Add"):
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], [])), f"{n.name} output"

    # [TRT-QT] residual Add: TensorRT fuses the Add into the convolution that ends the main branch
    # and reads the shortcut in int8, so only the shortcut input carries Q/DQ [MO]
    # build_non_residual_input_map. The main branch ends in the block's conv3; the shortcut is
    # the block's input (the previous block's last ReLU), or its downsample convolution, which
    # reads the block's input too. In a downsample block both Add inputs are convolutions, so
    # "one Conv input, one DequantizeLinear input" would not notice Q/DQ on the wrong one.
    adds = [n for n in g.node if n.op_type == "Add"]
    assert len(adds) == 16  # ResNet50's bottleneck blocks
    shortcuts: collections.Counter[str] = collections.Counter()
    for n in adds:
        block = n.name.rsplit("/", 1)[0]  # e.g. /layer2/layer2.1
        quantized = [i for i in n.input if producer[i].op_type == "DequantizeLinear"]
        plain = [i for i in n.input if producer[i].op_type != "DequantizeLinear"]
        assert len(quantized) == len(plain) == 1, f"{n.name}: inputs from {[producer[i].name for i in n.input]}"
        assert producer[plain[0]].name == f"{block}/conv3/Conv", (
            f"{n.name}: unquantized input from {producer[plain[0]].name}"
        )
        qn = producer[producer[quantized[0]].input[0]]
        assert qn.op_type == "QuantizeLinear", f"{n.name}: {qn.name} feeds its DequantizeLinear"
        short = producer[qn.input[0]]
        block_input = by_name[f"{block}/conv1/Conv"].input[0]  # the DequantizeLinear output conv1 reads
        if short.op_type == "Relu":
            assert quantized[0] == block_input, f"{n.name}: shortcut {short.name} is not the block's input"
        else:
            assert short.name == f"{block}/downsample/downsample.0/Conv", f"{n.name}: quantized input from {short.name}"
            assert short.input[0] == block_input, f"{n.name}: {short.name} does not read the block's input"
        shortcuts[short.op_type] += 1
    assert shortcuts == {"Relu": 12, "Conv": 4}, shortcuts


def test_s8s8_follows_tensorrt_explicit_quantization_rules(s8s8: Path) -> None:
    """The TensorRT rules on the real exported ResNet50."""
    _check_tensorrt_rules(s8s8)


def test_s8s8_rules_hold_when_convolutions_share_weights(
    fmnist_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Convolutions in different blocks can read one weight initializer: exporters and optimizers
    merge identical ones, e.g. the all-zero conv3 weights (one per stage) of an untrained
    ``zero_init_residual`` model after BatchNorm folding. The weights' DequantizeLinear is then
    common to unrelated blocks, and the residual rule must still find each block's main branch."""
    import onnx
    import torch

    from calibration.quantize import calibrate
    from export.onnx import export_fp32
    from rn50.model import build_model
    from rn50.preprocess import Preprocessing

    torch.manual_seed(0)
    fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    export_fp32(build_model(10), 32, fp32)
    train, _ = load_dataset(fmnist_tiny)
    files = calibration_set(train.files, train.labels, 20)
    p = Preprocessing.for_image_size(32)
    calibrate(fp32, q, files, p, method="minmax", flavour="s8s8", cache_dir=tmp_path / "cache")
    weights = collections.Counter(n.input[1] for n in onnx.load(str(q)).graph.node if n.op_type == "Conv")
    assert max(weights.values()) > 1, "no two convolutions share weights: this test no longer tests that"
    _check_tensorrt_rules(q)
    # a cache entry damaged from outside (written whole, then cut) is calibrated again, not served
    (entry,) = (tmp_path / "cache").glob("*.onnx")
    entry.write_bytes(entry.read_bytes()[:1000])
    capsys.readouterr()
    info = calibrate(fp32, q, files, p, method="minmax", flavour="s8s8", cache_dir=tmp_path / "cache")
    assert info["cache_hit"] is False and f"cached model {entry} is unreadable" in capsys.readouterr().err
    _check_tensorrt_rules(q)
    onnx.load(str(entry))  # whole again


def test_cache_hit_and_gate_refusal(
    s8s8: Path, trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = s8s8.parent
    base = s8s8_args(trained_run)
    # 1. same inputs: the cached calibration is reused (no calibration pass)
    again = folder / "again.onnx"
    assert export.main(base + ["--output", str(again), "--force"]) == 0
    err = capsys.readouterr().err
    assert "cache hit" in err and "calibrating" not in err, err
    assert read_manifest(again)["int8"]["cache_hit"] is True
    assert again.read_bytes() == s8s8.read_bytes()
    # 2. a bound no model meets (an agreement floor above 100 %; --max-top1-drop takes 0-100
    # only): refused, exit 3, nothing written
    from rn50 import compare

    monkeypatch.setitem(compare.BOUNDS, "int8", dataclasses.replace(compare.BOUNDS["int8"], min_top1_agreement=100.5))
    refused = folder / "refused.onnx"
    before = set(os.listdir(folder))
    assert export.main(base + ["--output", str(refused)]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(("error: INT8 loses", "error: INT8 fails the accuracy gate")), last
    assert "nothing written" in last
    assert "class that lost most: " in last or "no class lost top-1" in last, last
    assert set(os.listdir(folder)) == before
    # 3. the same with --force: written, and the manifest says it failed the gate
    assert export.main(base + ["--output", str(refused), "--force"]) == 0
    assert read_manifest(refused)["int8"]["gate"]["passed"] is False
    # one calibration served all four runs
    assert len(list((folder / ".calib-cache").glob("*.onnx"))) == 1


def test_cache_key_follows_image_bytes_and_preprocessing(tmp_path: Path) -> None:
    from calibration.quantize import cache_key
    from rn50.preprocess import Preprocessing

    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    imgs = [tmp_path / f"{i}.jpg" for i in range(3)]
    for i, f in enumerate(imgs):
        f.write_bytes(bytes([i]) * 10)
    files = [str(f) for f in imgs]
    p = Preprocessing(image_size=32)
    key = cache_key(model, files, "percentile", 3, "u8s8", p)
    assert cache_key(model, files, "percentile", 3, "u8s8", p) == key
    # the data set converted again in place: same names, other bytes -> a new calibration
    imgs[1].write_bytes(b"other pixels")
    changed = cache_key(model, files, "percentile", 3, "u8s8", p)
    assert changed != key
    assert cache_key(model, files, "percentile", 3, "u8s8", Preprocessing(image_size=64)) != changed
    assert cache_key(model, files, "entropy", 3, "u8s8", p) != changed
    assert cache_key(model, files, "percentile", 3, "s8s8", p) != changed


def test_cache_key_follows_the_quantizer_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import calibration.quantize as cq
    from rn50.preprocess import Preprocessing

    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    img = tmp_path / "0.jpg"
    img.write_bytes(b"pixels")
    p = Preprocessing(image_size=32)
    key = cq.cache_key(model, [str(img)], "percentile", 1, "s8s8", p)
    other = {**cq.TENSORRT_OPTIONS, "extra_options": {**cq.TENSORRT_OPTIONS["extra_options"], "QuantizeBias": True}}
    monkeypatch.setattr(cq, "TENSORRT_OPTIONS", other)
    changed = cq.cache_key(model, [str(img)], "percentile", 1, "s8s8", p)
    assert changed != key
    monkeypatch.setattr(cq, "POSTPROCESS_VERSION", cq.POSTPROCESS_VERSION + 1)
    assert cq.cache_key(model, [str(img)], "percentile", 1, "s8s8", p) != changed


def test_entropy_calibration_is_not_minmax(engine_fp32_onnx: Path, fmnist_small: Path, tmp_path: Path) -> None:
    """quantize_static's own Entropy (128 bins for a 128-bin window) returned the min-max ranges
    bit for bit. Ours must clip many activations below their observed maximum (entropy and
    percentile alike), and never go above it."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data

    from calibration.quantize import _compute_ranges, _Reader

    train, _ = load_dataset(fmnist_small)
    files = calibration_set(train.files, train.labels, 50)
    p = preprocessing_of(read_manifest(engine_fp32_onnx))
    name = onnx.load(str(engine_fp32_onnx), load_external_data=False).graph.input[0].name
    ranges = {}
    for method in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"{method}.json"
        _compute_ranges(engine_fp32_onnx, out, _Reader(files, p, name), method, "u8s8")
        ranges[method] = load_tensors_data(out).data
    hi = {m: {k: float(np.max(v.highest)) for k, v in r.items()} for m, r in ranges.items()}
    common = set(hi["minmax"]) & set(hi["entropy"]) & set(hi["percentile"])
    assert len(common) > 50
    for m in ("entropy", "percentile"):
        assert all(hi[m][k] <= hi["minmax"][k] * (1 + 1e-6) + 1e-6 for k in common), m
        clipped = sum(hi[m][k] < 0.99 * hi["minmax"][k] for k in common)
        assert clipped > len(common) // 4, f"{m} clipped only {clipped} of {len(common)} tensors: degenerate"
