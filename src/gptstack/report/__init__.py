"""The report card of a run: `write_report(run_dir) -> (report.md, report.html)` (see card.py).

    gptstack report runs/tiny
    from gptstack.report import write_report; write_report("runs/tiny")

Imported lazily so that loading a config (which imports report.config) does not pull in matplotlib.
"""
from __future__ import annotations

from pathlib import Path

from .config import ReportConfig


def write_report(run_dir: str | Path, cfg: ReportConfig | None = None) -> tuple[Path, Path]:
    """Write RUN/report.md (plots as RUN/report-*.png beside it) and a self-contained RUN/report.html."""
    from .card import write_report as write

    return write(run_dir, cfg)


__all__ = ["ReportConfig", "write_report"]
