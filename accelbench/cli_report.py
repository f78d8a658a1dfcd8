"""Reporting commands (added to the `accelbench` parser by cli.build_parser via `register`): report, compare, import-flagperf.

None of them trains or imports torch: they read result.json, events.jsonl, mmmu.json and READMEs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from .report.html import write_reports

    out = write_reports(args.run_dir)
    print(f"report.md: {out['markdown']}")
    print(f"report.html: {out['html']}")
    for p in out["plots"]:
        print(f"plot {p.name}: {p.path} ({', '.join(f'{k} {v}' for k, v in p.points.items())} points)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report.compare import compare, render_compare

    report = compare(args.runs, baseline=args.baseline)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        print(render_compare(report), end="")
    return 0


def cmd_import_flagperf(args: argparse.Namespace) -> int:
    from .atomic import write_json_atomic
    from .report.flagperf_import import import_flagperf

    entry = import_flagperf(args.file, chips_per_board=args.chips_per_board)
    if args.out:
        write_json_atomic(Path(args.out), entry)
    if args.json:
        print(json.dumps(entry, indent=2, ensure_ascii=False))
    else:
        print(f"{entry['source']}: {entry['vendor']} {entry['device']} x {entry['device_count']}, "
              f"{entry['dtype'] or 'dtype ?'}, MPE {entry['MPE'] or '?'}")
        for r in entry["rows"]:
            mem = "/" if r["mem_used_gib"] is None else f"{r['mem_used_gib']:g}/{r['mem_total_gib']:g} GiB"
            print(f"  line {r['line']}: {r['stage']}: token/p/s {_v(r['tokens_per_s_per_proc'], fmt='{:.2f}')}, "
                  f"loss {_v(r['loss'], fmt='{:.4f}')}, mem {mem}, MMMU {_v(r['mmmu_accuracy'], 100, '{:.1f}')}, "
                  f"MFU {_v(r['mfu'], 100, '{:.2f}%')}")
    if args.out:
        print(f"written: {args.out} (give it to `accelbench compare` as a run)")
    return 0


def _v(x: float | None, scale: float = 1, fmt: str = "{:.4g}") -> str:
    return "/" if x is None else fmt.format(x * scale)


def register(sub: Any) -> None:
    """Add report, compare and import-flagperf to the `accelbench` subparsers (called by cli.build_parser)."""
    s = sub.add_parser("report", help="re-render a run's report.md and write report.html with plots")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("compare", help="runs side by side in FlagPerf's table layout, with ratios and warnings")
    s.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory, result.json, or a JSON file from `accelbench import-flagperf`")
    s.add_argument("--baseline", type=int, default=1, metavar="N", help="position of the baseline run (default 1)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("import-flagperf", help="parse a FlagPerf case README's performance table")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print the parsed entry (rows included) as JSON")
    s.add_argument("--out", metavar="FILE", help="write the entry as JSON (a 'run' for `accelbench compare`)")
    s.add_argument("--chips-per-board", type=int,
                   help="chips per card of the published device (default: known two-chip cards, else 1)")
    s.set_defaults(func=cmd_import_flagperf)

