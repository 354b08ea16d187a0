"""make bench: each script writes its table as Markdown with a bar chart of its images/s beside it."""

from __future__ import annotations

import re
from pathlib import Path

from bench import data_loaders
from tests.pngs import check_png


def test_data_loaders_writes_table_and_chart(fmnist_tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    assert (
        data_loaders.main(
            [
                "--data",
                str(fmnist_tiny),
                "--images",
                "40",
                "--batch-size",
                "10",
                "--workers",
                "1",
                "--image-size",
                "32",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    md = (out / "data_loaders.md").read_text()
    rows = re.findall(r"^\| (DALI CPU|torchvision DataLoader) \| ([0-9,]+) \| ([0-9.]+)x \|$", md, re.M)
    assert [r[0] for r in rows] == ["DALI CPU", "torchvision DataLoader"] and rows[1][2] == "1.00"
    assert md.split("\n![")[0].strip() in printed  # the table written is the one printed
    assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", md) == ["data_loaders.png"]
    check_png(out / "data_loaders.png", min_size=(400, 120))
    assert sorted(p.name for p in out.iterdir()) == ["data_loaders.md", "data_loaders.png"]


def test_data_loaders_epochs_with_and_without_building_ahead(fmnist_tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    args = ["--data", str(fmnist_tiny), "--images", "40", "--batch-size", "10", "--workers", "1"]
    assert data_loaders.main([*args, "--image-size", "32", "--epochs", "3", "--output", str(out)]) == 0
    md = (out / "data_loaders_ahead.md").read_text()
    rows = re.findall(r"^\| (built [a-z ]+) \| (\d/\d) \|((?: [0-9.]+x? \|)+)$", md, re.M)
    assert [r[0] for r in rows] == ["built when its epoch starts", "built ahead during the epoch before"]
    assert [r[1] for r in rows] == ["0/2", "2/2"]  # epochs 2 and 3 of the second ran on pipelines built ahead
    assert rows[0][2].endswith(" 1.000x |")  # the loader building at epoch start is the reference
    assert "epochs 2-3" in md and "machine: " in md
    assert sorted(p.name for p in out.iterdir()) == ["data_loaders_ahead.md", "data_loaders_ahead.png"]
    check_png(out / "data_loaders_ahead.png", min_size=(400, 120))
