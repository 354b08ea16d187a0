"""Export and INT8 calibration on a data set with one undecodable image: one ``error:`` line
naming it, exit 2, and nothing left in the output folder (no artifact, no calibration cache)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

import export
from tests.stderr import error_line


def _gif_named_jpg() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(b, format="GIF")
    return b.getvalue()


@pytest.mark.parametrize("precision, split", [("fp32", "val"), ("int8", "train")])
def test_undecodable_image_stops_export(precision, split, trained_run, fmnist_tiny, tmp_path, capsys):
    """fp32: the image is one of the parity images (val); int8: one of the calibration images (train)."""
    data = tmp_path / "data"
    shutil.copytree(fmnist_tiny, data)
    for victim in (data / split / "coat").iterdir():  # every image of the class, so any sample holds one
        victim.write_bytes(_gif_named_jpg())
    out_dir = tmp_path / "artifacts"
    out_dir.mkdir()
    rc = export.main(
        [
            "--checkpoint",
            str(trained_run / "best.pt"),
            "--precision",
            precision,
            "--data",
            str(data),
            "--output",
            str(out_dir / f"rn50.{precision}.onnx"),
            "--calib-size",
            "40",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    line = error_line(err)
    assert "error: undecodable image(s): " in line, line
    assert str(data / split / "coat") in line and "unsupported image format GIF" in line, line
    assert sorted(p.name for p in out_dir.iterdir()) == [], "export left files behind"
