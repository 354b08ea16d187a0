"""Where a benchmark's results go: its Markdown text printed and written to ``DIR/NAME.md``, and
its images/s as a bar chart in ``DIR/NAME.png`` beside it (``rn50.plots.throughput_bars``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

DEFAULT_DIR = Path("runs/bench")


def add_output_flag(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_DIR,
        metavar="DIR",
        help=f"folder for {name}.md (the table printed) and {name}.png (its bar chart) (default: %(default)s)",
    )


def publish(out_dir: Path, name: str, text: str, title: str, panels: Mapping[str, Mapping[str, float]]) -> None:
    """Print ``text`` (the Markdown table with its header lines), write it and the chart."""
    from rn50.atomic import write_text
    from rn50.plots import throughput_bars

    print(text, end="" if text.endswith("\n") else "\n")
    md, png = out_dir / f"{name}.md", out_dir / f"{name}.png"
    throughput_bars(title, panels, png)
    write_text(md, text.rstrip("\n") + f"\n\n![{title}]({png.name})\n")
    print(f"bench: wrote {md} and {png}", file=sys.stderr)
