"""make bench: each script writes its table as Markdown with a bar chart of its images/s beside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "module, argv, line",
    [
        ("serve", ["--images", "0"], "error: --images 0: must be at least 1"),
        ("serve", ["--batch-size", "0"], "error: --batch-size 0: must be at least 1"),
        ("inference", ["--seconds", "0"], "error: --seconds 0: must be above 0"),
        ("data_loaders", ["--images", "-1"], "error: --images -1: must be at least 0"),  # 0: all of them
        ("finetune", ["--epochs", "0"], "error: --epochs 0: must be at least 1"),
        ("gpu_check", ["--seconds", "nan", "table"], "error: --seconds nan: must be a finite number above 0"),
        ("triton", ["--concurrency", "8", "0"], "error: --concurrency 0: must be at least 1"),
    ],
)
def test_bench_numeric_flags_are_checked_before_work(module, argv, line, capsys) -> None:
    """A count of 0 or a negative time is one error line and exit 2 (bench.serve --images 0 was a traceback)."""
    import importlib

    mod = importlib.import_module(f"bench.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_inference_refuses_a_checkpoint_named_but_missing(tmp_path: Path, capsys) -> None:
    """Only the default checkpoint may be missing (an untrained stand-in is timed then); one named
    on purpose and not found is an error, not another model's figures."""
    from bench import inference

    assert inference.main(["--checkpoint", str(tmp_path / "no.pt"), "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'no.pt'}: checkpoint not found"
    assert list(tmp_path.iterdir()) == []
