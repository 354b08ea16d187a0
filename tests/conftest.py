"""Shared fixtures: real Fashion-MNIST subsets and one small trained model per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))


# ============================================================================ data and the trained model
# (owned by train/: `fmnist_small` and `trained_run` are used by the export, calibration and serve
#  tests too; change their sizes only together with those tests)


def _need_fmnist():
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            "Fashion-MNIST is missing: `make test` installs Debian's dataset-fashion-mnist; "
            "run `apt-get install -y dataset-fashion-mnist`"
        )


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """A real Fashion-MNIST subset in the ImageNet layout: 200 train / 50 val images per class."""
    _need_fmnist()
    from rn50.fashion_mnist import convert

    return convert(tmp_path_factory.mktemp("fmnist") / "fm", per_class_train=200, per_class_val=50, progress=False)


@pytest.fixture(scope="session")
def fmnist_tiny(tmp_path_factory) -> Path:
    """A very small real subset (20 train / 5 val per class) for argument and error tests."""
    _need_fmnist()
    from rn50.fashion_mnist import convert

    return convert(tmp_path_factory.mktemp("fmnist-tiny") / "fm", per_class_train=20, per_class_val=5, progress=False)


TRAINED_RUN_ARGS = [
    "--profile",
    "cpu",
    "--data-backend",
    "dali-cpu",
    "--no-compile",
    "--image-size",
    "32",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--min-crop-scale",
    "0.5",
    "--warmup-epochs",
    "0.3",
    "--workers",
    "1",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fmnist_small) -> Path:
    """A small ResNet50 v1.5 trained once per session with the project's trainer (`train.main`).

    All 2,000 training images of `fmnist_small` x 3 epochs at 32 px, batch 32, dali-cpu, no
    compile: about 90 s on 2 idle cores, >= 70 % val top-1 on the 500 val images (asserted in
    tests/train/test_training.py). Returns the run folder (best.pt, last.pt, manifests, metrics).
    """
    import train

    out = tmp_path_factory.mktemp("run") / "run"
    rc = train.main(["--data", str(fmnist_small), "--output", str(out), *TRAINED_RUN_ARGS])
    assert rc == 0, "training the shared test model failed"
    assert (out / "best.pt").is_file()
    return out


# ============================================================================ serving engines
# (owned by serve/: engines built from `trained_run` by the export CLI, one per session)


def _export_engine(tmp_path_factory, run: Path, precision: str, suffix: str) -> Path:
    out = tmp_path_factory.mktemp(f"engine-{precision}{suffix.replace('.', '-')}") / f"rn50.{precision}{suffix}"
    import export

    rc = export.main(["--checkpoint", str(run / "best.pt"), "--precision", precision, "--output", str(out)])
    assert rc == 0, f"export --precision {precision} --output {out.name} failed"
    assert out.is_file() and Path(str(out) + ".manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def engine_fp32_onnx(tmp_path_factory, trained_run) -> Path:
    return _export_engine(tmp_path_factory, trained_run, "fp32", ".onnx")


@pytest.fixture(scope="session")
def engine_int8_onnx(tmp_path_factory, trained_run) -> Path:
    return _export_engine(tmp_path_factory, trained_run, "int8", ".onnx")


@pytest.fixture(scope="session")
def engine_pt2(tmp_path_factory, trained_run) -> Path:
    return _export_engine(tmp_path_factory, trained_run, "fp32", ".pt2")


@pytest.fixture(scope="session")
def engine_checkpoint(trained_run) -> Path:
    """The training checkpoint itself, which serve runs as an eager PyTorch engine."""
    return trained_run / "best.pt"


@pytest.fixture(scope="session")
def resnet50_weights(tmp_path_factory) -> Path:
    """An untrained ResNet50 v1.5 state dict (10 classes) saved as a plain weights file: what
    --init-from reads, for runs and dry runs that must get past its check."""
    import torch

    from rn50.model import build_model

    path = tmp_path_factory.mktemp("weights") / "rn50.pth"
    torch.save(build_model(10).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs from scikit-image as files: JPEG, PNG, grayscale JPEG, CMYK JPEG and a
    JPEG whose pixels are stored rotated with EXIF orientation 6 (display = rotate 90 cw)."""
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    out = {}
    Image.fromarray(data.astronaut()).save(d / "astronaut.jpg", quality=92)
    out["jpeg"] = d / "astronaut.jpg"
    Image.fromarray(data.coffee()).save(d / "coffee.png")
    out["png"] = d / "coffee.png"
    Image.fromarray(data.camera()).save(d / "camera_gray.jpg", quality=92)
    out["gray"] = d / "camera_gray.jpg"
    Image.fromarray(data.chelsea()).convert("CMYK").save(d / "chelsea_cmyk.jpg", quality=92)
    out["cmyk"] = d / "chelsea_cmyk.jpg"
    # Store the upright image rotated 90 degrees ccw and tag it "rotate 90 cw to display".
    upright = Image.fromarray(data.rocket())
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(d / "rocket_exif6.jpg", quality=92, exif=exif)
    out["exif"] = d / "rocket_exif6.jpg"
    out["exif_upright"] = d / "rocket_upright.jpg"
    upright.save(out["exif_upright"], quality=92)
    return out
