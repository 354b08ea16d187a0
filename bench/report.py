"""Where a benchmark's results go: its Markdown text printed and written to ``DIR/NAME.md``, and
its images/s as a bar chart in ``DIR/NAME.png`` beside it (``rn50.plots.throughput_bars``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

DEFAULT_DIR = Path("runs/bench")


def parse_checked(
    ap: argparse.ArgumentParser, argv: list[str] | None, may_be_zero: tuple[str, ...] = ()
) -> argparse.Namespace:
    """``ap.parse_args(argv)``, then every int flag at least 1 and every float flag above 0 (those
    in ``may_be_zero``: at least 0), else one ``error: --flag VALUE: must be ...`` line and exit 2
    (:mod:`rn50.flags`): a count of 0 or a negative time would otherwise end in a traceback, or in a
    table of nothing, after the setup."""
    from rn50.flags import Range, number

    args = ap.parse_args(argv)
    for a in ap._actions:
        flag = next((o for o in a.option_strings if o.startswith("--")), None)
        value = getattr(args, a.dest, None)
        if flag is None or a.type not in (int, float) or value is None:
            continue
        zero = flag in may_be_zero
        rng = Range(lo=0 if zero or a.type is float else 1, lo_open=a.type is float and not zero)
        for v in value if isinstance(value, list) else [value]:  # nargs="+" flags: each value
            why = rng.problem(v)
            if why:
                ap.exit(2, f"error: {flag} {number(v)}: {why}\n")
    return args


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
