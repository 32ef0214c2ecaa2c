"""The `report` section of a config (kept apart from the card so configs load without matplotlib)."""
from dataclasses import dataclass, field


@dataclass
class ReportConfig:
    samples: int = field(default=5, metadata={"help": "sample responses shown per policy stage (the first of each task family first)"})
    bon_n: int = field(default=16, metadata={"help": "n of the best-of-n row of the top table and of its claim (the largest n run when this one was not)"})
    dpi: int = field(default=100, metadata={"help": "resolution of the plots (PNG, embedded in report.html and saved beside report.md)"})
