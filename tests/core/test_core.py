"""The shared core: ResNet50 v1.5 layout and initialisation, checkpoints, manifests, atomic writes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from rn50.backends import load_engine
from rn50.checkpoint import load_checkpoint, load_model, save_checkpoint
from rn50.errors import CheckpointError, ManifestError
from rn50.manifest import manifest_path, new_manifest, read_manifest, sha256_file, write_manifest
from rn50.model import build_model, check_v15, param_groups
from rn50.preprocess import Preprocessing
from tests.killed import killed_renaming


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(10)


def test_v15_stride_on_3x3(model):
    check_v15(model)
    downs = [m for m in model.modules() if isinstance(m, Bottleneck) and m.conv2.stride == (2, 2)]
    assert len(downs) == 3  # layer2, layer3, layer4 each start with a stride-2 3x3
    assert all(m.conv1.stride == (1, 1) for m in downs)


def test_kaiming_fan_out_init(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)
            assert m.weight.std().item() == pytest.approx(expected, rel=0.1), name


def test_batchnorm_init_and_zero_gamma_on_last_bn(model):
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    last = {id(b.bn3) for b in blocks}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.bias == 0)
            assert torch.all(m.weight == (0 if id(m) in last else 1))


def test_weight_decay_only_on_conv_and_fc_weights(model):
    decay, no_decay = param_groups(model, 1 / 32768)
    assert decay["weight_decay"] == 1 / 32768 and no_decay["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    for p in decay["params"]:
        assert names[id(p)].endswith("weight") and p.ndim in (2, 4)
    undecayed = {names[id(p)] for p in no_decay["params"]}
    bn_params = {
        f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for k in ("weight", "bias")
    }
    assert bn_params <= undecayed and "fc.bias" in undecayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _manifest(classes=10, **extra):
    return new_manifest(
        "checkpoint",
        classes=[f"c{i}" for i in range(classes)],
        preprocessing=Preprocessing.for_image_size(32),
        precision="fp32",
        **extra,
    )


def test_checkpoint_round_trip_weights_only(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _manifest(), epoch=3)
    obj = torch.load(path, weights_only=True)
    assert obj["epoch"] == 3
    m2, man = load_model(path)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    # the file beside it is the embedded manifest plus the record of the checkpoint file itself
    # (a file cannot hold its own hash)
    beside = read_manifest(path)
    assert beside["artifact"] == {"sha256": sha256_file(path)}
    assert {k: v for k, v in beside.items() if k != "artifact"} == man
    assert {p.name for p in tmp_path.iterdir()} == {"m.pt", "m.pt.manifest.json"}  # no temp files left


def test_truncated_checkpoint_is_named(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _manifest())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pt"):
        load_checkpoint(path)


def test_checkpoint_class_count_mismatch(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _manifest(classes=7))
    with pytest.raises(CheckpointError, match="10 outputs but its manifest lists 7"):
        load_model(path)


def test_missing_and_bad_manifest(tmp_path):
    art = tmp_path / "x.onnx"
    art.write_bytes(b"x")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(art)
    manifest_path(art).write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(art)
    manifest_path(art).write_text(json.dumps({"schema": 1}))
    with pytest.raises(ManifestError, match="lacks"):
        read_manifest(art)
    m = _manifest()
    write_manifest(art, m)
    assert read_manifest(art)["classes"] == m["classes"]


def test_contract_margin_even_and_round_trip():
    for s in (32, 64, 100, 224, 288):
        p = Preprocessing.for_image_size(s)
        assert (p.resize_size - p.image_size) % 2 == 0
        assert Preprocessing.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert Preprocessing.for_image_size(224).resize_size == 256


@pytest.mark.parametrize(
    "data",
    [b"hello world " * 100, b"\x80\x04" + b"hello" * 50, b"\0" * 1000, b"model weights\n"],
    ids=["text-repeated", "pickle-header-then-text", "zeros", "one-line-text"],
)
def test_garbage_checkpoints_are_named_errors(tmp_path, data):
    """Whatever bytes a .pt holds, loading it ends in a CheckpointError naming the file (an error:
    line, exit 2 in every CLI), never another exception type escaping as a traceback."""
    from rn50.checkpoint import load_checkpoint
    from rn50.errors import CheckpointError

    p = tmp_path / "junk.pt"
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(p)


# ------------------------------------------------------------------ the manifest describes its file


def test_a_file_swapped_behind_its_manifest_is_refused(tmp_path, model):
    """Copying one artifact over another keeps the other's manifest: load_engine sees that the
    file is not the one the manifest describes (before anything is loaded from it)."""
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict(), _manifest(), epoch=1)
    b = save_checkpoint(tmp_path / "b.pt", model.state_dict(), _manifest(), epoch=2)
    want = read_manifest(a)["artifact"]["sha256"]
    shutil.copy(b, a)
    with pytest.raises(ManifestError) as e:
        load_engine(a, prefer_gpu=False)
    msg = str(e.value)
    assert msg.startswith(f"{a} does not match its manifest: the manifest describes a file with sha256 {want[:12]}")
    assert f"this file has {sha256_file(b)[:12]}" in msg and "re-export it or restore the matching manifest" in msg
    # a manifest without the record (written before manifests had one) still loads
    m = json.loads(manifest_path(a).read_text())
    del m["artifact"]
    manifest_path(a).write_text(json.dumps(m))
    assert load_engine(a, prefer_gpu=False)[1]["classes"] == m["classes"]


@pytest.mark.parametrize("key", ["classes", "preprocessing"])
def test_a_checkpoints_manifest_file_must_match_the_one_inside(tmp_path, model, key):
    """The file beside a .pt is a copy of the manifest inside it, which export and serve.validate
    read: edited (class names reversed, another mean), serving would rename the outputs or change
    the inputs without a word."""
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict(), _manifest(), epoch=1)
    m = json.loads(manifest_path(a).read_text())
    if key == "classes":
        m["classes"] = m["classes"][::-1]
    else:
        m["preprocessing"]["mean"] = [0.0, 0.0, 0.0]
    manifest_path(a).write_text(json.dumps(m))
    with pytest.raises(ManifestError) as e:
        load_engine(a, prefer_gpu=False)
    assert str(e.value).startswith(
        f"{a}: the manifest beside it (a.pt.manifest.json) and the one inside the checkpoint differ in {key!r}"
    )


@pytest.mark.parametrize("dies_at", ["manifest", "file"])
def test_a_save_killed_between_file_and_manifest_is_detectable(tmp_path, model, monkeypatch, dies_at):
    """save_checkpoint over an existing checkpoint, killed as it renames the manifest or the file
    into place: afterwards load_engine either serves a file with the manifest written for it, or
    refuses the pair; never a new file under the old manifest (or the reverse) unnoticed."""
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), _manifest(accuracy={"top1": 1.0}), epoch=1)
    target = manifest_path(path) if dies_at == "manifest" else path
    with killed_renaming(monkeypatch, target):
        save_checkpoint(path, model.state_dict(), _manifest(accuracy={"top1": 2.0}), epoch=2)
    try:
        _, m = load_engine(path, prefer_gpu=False)
    except ManifestError as e:
        assert "does not match its manifest" in str(e)
    else:
        assert m["accuracy"]["top1"] == torch.load(path, weights_only=True)["epoch"]


# ------------------------------------------------------------------ malformed manifests


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("mean", [123.7, 116.3], "mean"),
        ("mean", [123.7, "x", 103.5], "mean"),
        ("std", [58.4, 0, 57.4], "std"),
        ("std", [58.4, -57.1, 57.4], "std"),
        ("image_size", 0, "image_size"),
        ("image_size", "32", "image_size"),
        ("image_size", 32.0, "image_size"),
        ("resize_size", 16, "resize_size"),
        ("train_scale", [0.5, 0.1], "train_scale"),
        ("flip_prob", 2, "flip_prob"),
        ("interpolation", "nearest", "interpolation"),
        ("layout", "NHWC", "layout"),
    ],
)
def test_malformed_preprocessing_is_a_manifest_error(tmp_path, field, value, needle):
    """A preprocessing block DALI cannot run (or would run as something else) is refused where
    the manifest is read, naming the manifest file and the field, not per image later."""
    art = tmp_path / "x.onnx"
    write_manifest(art, _manifest())
    m = json.loads(manifest_path(art).read_text())
    m["preprocessing"][field] = value
    manifest_path(art).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="bad preprocessing") as e:
        read_manifest(art)
    assert str(e.value).startswith(f"{manifest_path(art)}: ") and needle in str(e.value)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.pop("classes"), "lacks classes"),
        (lambda m: m.update(classes=[]), "classes"),
        (lambda m: m.update(classes=["a", ""]), "classes"),
        (lambda m: m.update(classes=["a", "a"]), "classes"),
        (lambda m: m.update(classes=[1, 2]), "classes"),
        (lambda m: m.update(preprocessing=[1, 2]), "preprocessing"),
        (lambda m: m.update(preprocessing=None), "preprocessing"),
        (lambda m: m.update(schema="1"), "manifest schema '1' is not 1"),
        (lambda m: m.update(image_size="32"), "manifest 'image_size' must be a whole number, at least 1, not '32'"),
        (lambda m: m.update(max_batch="abc"), "manifest 'max_batch' must be a whole number, at least 1, not 'abc'"),
        (lambda m: m.update(max_batch=0), "'max_batch' must be a whole number, at least 1, not 0"),
        (lambda m: m.update(model_version="abc"), "'model_version' must be a whole number, at least 1, not 'abc'"),
        (lambda m: m.update(artifact="x"), "manifest 'artifact' must be {\"sha256\": <64 hex digits>}"),
        (lambda m: m.update(artifact={"sha256": None}), "manifest 'artifact' must be"),
    ],
    ids=[
        "missing",
        "empty",
        "empty-name",
        "duplicate",
        "not-strings",
        "preprocessing-list",
        "preprocessing-null",
        "schema-string",
        "image-size-string",
        "max-batch-string",
        "max-batch-0",
        "model-version-string",
        "artifact-string",
        "artifact-null-sha",
    ],
)
def test_malformed_classes_or_preprocessing_block(tmp_path, edit, needle):
    art = tmp_path / "x.onnx"
    write_manifest(art, _manifest())
    m = json.loads(manifest_path(art).read_text())
    edit(m)
    manifest_path(art).write_text(json.dumps(m))
    with pytest.raises(ManifestError) as e:
        read_manifest(art)
    assert str(e.value).startswith(f"{manifest_path(art)}: ") and needle in str(e.value)


@pytest.mark.parametrize("name, command", [("best.pt", "train"), ("rn50.onnx", "export")])
def test_a_missing_manifest_names_the_command_that_writes_one(tmp_path, name, command):
    from rn50.errors import ManifestError
    from rn50.manifest import read_manifest

    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ManifestError, match=rf"was {re.escape(name)} produced by `python -m {command}`\?"):
        read_manifest(tmp_path / name)


def test_a_data_root_given_for_a_split_is_named_as_such(tmp_path):
    from rn50.errors import DataError
    from rn50.layout import scan_split

    for split in ("train", "val"):
        (tmp_path / split / "bag").mkdir(parents=True)
    want = rf"looks like a data root: give its split folder, {re.escape(str(tmp_path / 'val'))}"
    with pytest.raises(DataError, match=want):
        scan_split(tmp_path, ["bag", "coat"])


def test_a_write_through_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    """Renaming onto a link would replace the link with a plain file and leave its target stale."""
    from rn50.atomic import unwritable_reason, write_text

    (tmp_path / "v1.onnx").write_text("old")
    link = tmp_path / "current.onnx"
    link.symlink_to("v1.onnx")
    assert unwritable_reason(link) is None
    write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == "v1.onnx"
    assert (tmp_path / "v1.onnx").read_text() == "new"
    dangling = tmp_path / "next.onnx"
    dangling.symlink_to("sub/v2.onnx")  # a link to a file not written yet: created where it points
    write_text(dangling, "v2")
    assert dangling.is_symlink() and (tmp_path / "sub" / "v2.onnx").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx", "next.onnx", "sub", "v1.onnx"]


def test_devices_and_pipes_are_refused_not_replaced(tmp_path):
    """As root, renaming onto /dev/null would replace the device with a plain file."""
    from rn50.atomic import atomic_path, unwritable_reason

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dest in (Path(os.devnull), fifo):
        assert unwritable_reason(dest) == "is a device, pipe or socket, not a file (give a file path)"
        with pytest.raises(OSError, match="is a device, pipe or socket"):
            with atomic_path(dest):
                raise AssertionError("the body ran")
    assert Path(os.devnull).is_char_device() and fifo.is_fifo()
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_stdout_as_a_pipe_and_pseudo_file_systems_are_refused():
    """``--output /dev/stdout`` under ``| cat`` leads through /proc's links to ``pipe:[N]``, a name
    realpath returns but no path opens; /proc takes no new files even from root."""
    from rn50.atomic import unwritable_reason

    r, w = os.pipe()
    try:
        assert os.path.realpath(f"/proc/self/fd/{w}").endswith("]")  # pipe:[N], as stdout is under | cat
        assert unwritable_reason(f"/proc/self/fd/{w}") == "is a device, pipe or socket, not a file (give a file path)"
    finally:
        os.close(r), os.close(w)
    assert unwritable_reason("/proc/predictions.jsonl").startswith("cannot create a file in folder /proc (")


def test_stale_temporaries_are_found_beside_a_links_target(tmp_path):
    """A write through a link leaves its temporary (if killed) in the target's folder, named after
    the target; only those and the link folder's own are removed, nothing else."""
    from rn50.atomic import remove_stale_temporaries

    run, store = tmp_path / "run", tmp_path / "store"
    run.mkdir(), store.mkdir()
    (run / "last.pt").symlink_to(store / "v7.pt")
    stale = [run / ".best.pt.abcd1234.tmp", store / ".v7.pt.Zx_9y8w7.tmp"]
    keep = [store / ".other.pt.abcd1234.tmp", run / ".last.pt.short.tmp", store / "v7.pt"]
    for f in stale + keep:
        f.write_text("x")
    assert sorted(remove_stale_temporaries(run, ["best.pt", "last.pt"])) == sorted(stale)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)


@pytest.mark.parametrize(
    "name, kind",
    [("rn50.fp32.onnx", "an ONNX model"), ("rn50.plan", "a TensorRT engine"), ("best.pt.manifest.json", "a manifest")],
)
def test_another_artifact_given_as_weights_is_named_as_what_it_is(tmp_path, name, kind):
    """An export or a manifest given where a checkpoint or weights file belongs: said as such,
    not as torch.load's reading of its bytes ("Unsupported operand 8")."""
    from rn50.checkpoint import load_checkpoint
    from rn50.errors import CheckpointError
    from train.pretrained import read_weights

    f = tmp_path / name
    f.write_bytes(b"\x08\x07\x12\x07pytorch" if name.endswith(".onnx") else b'{"kind": "checkpoint"}')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f)
    assert str(e.value).startswith(f"{f}: is {kind}, not a checkpoint"), e.value
    with pytest.raises(CheckpointError) as e:
        read_weights(f)
    assert str(e.value).startswith(f"{f}: is {kind}, not a weights file"), e.value
    with pytest.raises(CheckpointError, match="is a directory, not a weights file"):
        read_weights(tmp_path)


def test_a_file_given_as_a_data_or_split_folder_is_named_as_a_file(tmp_path):
    from rn50.errors import DataError
    from rn50.layout import load_dataset, scan_split

    f = tmp_path / "README.md"
    f.write_text("x")
    with pytest.raises(DataError, match=r"README.md: is a file, not a data folder \(run `make data`"):
        load_dataset(f)
    with pytest.raises(DataError, match=r"README.md: is a file, not a folder \(expected a split folder: "):
        scan_split(f)
    with pytest.raises(DataError, match=r"nothere: folder not found \(expected a split folder: .*nothere/<class>/"):
        scan_split(tmp_path / "nothere")
