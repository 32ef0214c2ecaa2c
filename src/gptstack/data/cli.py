"""`gptstack data check FILE...`: validate data files the way every training stage will.

Per file, one line on stdout: `FILE: KIND, N rows (M usable, K skipped: reason ×count, ...) [source]`.
Structural errors (bad JSON, missing keys, wrong types, non-UTF-8 bytes) are listed on stderr,
one per bad line as `file:line: key: what was expected`, and make the exit status 2; irregular but
well-formed rows only give a warning (exit 0), since stages skip them and count them by reason,
unless no usable row is left: a file every stage would refuse is an error (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..common import UserError


def cmd_data_check(args: argparse.Namespace) -> int:
    from .formats import BAD_ROW, read_dataset

    status = 0
    reports = []
    for path in args.files:
        try:
            ds = read_dataset(path, skip_bad_rows=True, require_rows=False)
        except UserError as e:  # the file as a whole is unusable (missing, not gzip, unknown format)
            print(f"error: {e}", file=sys.stderr)
            reports.append({"path": str(path), "error": str(e)})
            status = 2
            continue
        for line in ds.errors:
            print(line, file=sys.stderr)
        irregular = {r: c for r, c in ds.skipped.items() if r != BAD_ROW}
        if irregular:
            reasons = ", ".join(f"{r} ×{c}" for r, c in sorted(irregular.items(), key=lambda x: -x[1]))
            print(f"warning: {path}: {sum(irregular.values())} irregular rows will be skipped ({reasons})", file=sys.stderr)
        # the errors come last, so a file's verdict is the last line it prints on stderr
        if ds.errors:
            print(f"error: {path}: {len(ds.errors)} bad row{'s' if len(ds.errors) != 1 else ''}; a stage stops on "
                  "this file before training unless given --skip-bad-rows", file=sys.stderr)
            status = 2
        if not ds.usable:
            print(f"error: {path}: no usable rows ({ds.n_rows} read, all skipped); a stage refuses this file",
                  file=sys.stderr)
            status = 2
        if args.json:
            reports.append({"path": ds.path, "kind": ds.kind, "source": ds.source, "rows": ds.n_rows,
                            "usable": ds.usable, "examples": len(ds.rows), "skipped": dict(ds.skipped),
                            "errors": ds.errors})
        else:
            print(ds.describe())
    if args.json:
        print(json.dumps(reports, indent=2, ensure_ascii=False))
    return status


def add_commands(commands, fmt) -> None:
    data = commands.add_parser("data", help="check data files (TRL, hh-rlhf, GSM8K, self-instruct, ...)",
                               description="Work with the data files stages read.", formatter_class=fmt)
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check", help="validate files and count usable rows", formatter_class=fmt,
        description="Read each file as a training stage would (JSON, JSONL, .gz; with the datasets extra also "
                    ".parquet and datasets save_to_disk folders, rows numbered from 1; TRL text/messages/"
                    "prompt+completion/preference/prompt-only, hh-rlhf transcripts, GSM8K, self-instruct, "
                    "alpaca, K-wise rankings) and print FILE: KIND, N rows (M usable, K skipped: reasons). "
                    "Every structural error is listed as file:line: key: expected (exit status 2); "
                    "irregular rows are counted by reason with a warning (exit status 0).")
    check.add_argument("files", nargs="+", metavar="FILE", help="data files (or save_to_disk folders) to check")
    check.add_argument("--json", action="store_true", help="print one JSON report for all files instead of lines")
    check.set_defaults(handler=cmd_data_check)
