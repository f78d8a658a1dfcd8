"""Published FlagPerf figures as comparison entries: parse a FlagPerf case README (the llava1.5_13b
vendor pages, Chinese) and return its performance table as an `accelbench.flagperf-import/1` dict.

The table is found by its header (配置 | fix_hp | token/p/s | loss | mem | acc(MMMU) | MFU), so prose
and other tables around it do not matter. "/" is FlagPerf's mark for "no value"; full-width
parentheses (（pretrain）) are as common as ASCII ones on those pages.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError

SCHEMA = "accelbench.flagperf-import/1"
HEADER = ["配置", "fix_hp", "token/p/s", "loss", "mem", "acc(mmmu)", "mfu"]
NA = "/"

# Published FlagPerf MFU divides by the vendor's spec peak of the *card*; where a card holds several
# chips and FlagPerf ran one process per chip (Iluvatar BI-V150: 2 chips, 32 GiB each), the
# throughput is per chip but the peak per card. Facts of published hardware, not of any backend.
_CHIPS_PER_BOARD = [(re.compile(r"bi-?v?150", re.I), 2)]

_FULLWIDTH = str.maketrans({"（": "(", "）": ")", "：": ":", "｜": "|", "　": " ", "％": "%", "／": "/", "×": "x"})


def _norm(cell: str) -> str:
    return re.sub(r"\s+", "", cell.translate(_FULLWIDTH)).lower()


def _cells(line: str, *, translate: bool = True) -> list[str]:
    body = line.strip().translate(_FULLWIDTH) if translate else line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|"):
        body = body[:-1]
    return [c.strip() for c in body.split("|")]


def _is_separator(cells: list[str]) -> bool:
    return bool(cells) and all(re.fullmatch(r":?-{2,}:?", c.replace(" ", "")) for c in cells)


def _number(cell: str, what: str, where: str, *, percent: bool = False) -> float | None:
    text = cell.strip()
    if text in {NA, "", "-"}:
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(%?)", text)
    if not m:
        raise AccelbenchError(f"{where}: {what} cell {cell!r} is not a number (or '/')")
    value = float(m.group(1))
    return value / 100 if percent or m.group(2) else value


def _memory(cell: str, where: str) -> tuple[float | None, float | None]:
    text = cell.strip()
    if text in {NA, "", "-"}:
        return None, None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*(?:gib|gb|g)?", text, re.I)
    if not m:
        raise AccelbenchError(f"{where}: mem cell {cell!r} is not 'used/total' GiB (or '/')")
    return float(m.group(1)), float(m.group(2))


def _config(cell: str, where: str) -> dict[str, Any]:
    stage = re.search(r"\(\s*(pretrain|finetune)\s*\)", cell, re.I)
    if not stage:
        raise AccelbenchError(f"{where}: config cell {cell!r} names no stage: expected '(pretrain)' or '(finetune)'")
    shape = re.search(r"\(\s*(\d+)\s*x\s*(\d+)\s*\)", cell, re.I)
    nnodes, nproc = (int(shape.group(1)), int(shape.group(2))) if shape else (None, None)
    # the device is what precedes "单机"/"多机" (one/several machines) or the first parenthesis
    device = re.split(r"单机|多机|\(", cell, maxsplit=1)[0].strip()
    return {"stage": stage.group(1).lower(), "device": device or None, "nnodes": nnodes, "nproc_per_node": nproc,
            "device_count": nnodes * nproc if shape else None}


def _text(cell: str | None) -> str | None:
    return None if cell is None or cell.strip() in {NA, ""} else cell.strip()


def _find_header(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if "|" in line and [_norm(c) for c in _cells(line)] == HEADER:
            return i
    return None


def _general_metrics(lines: list[str]) -> dict[str, str]:
    """The '通用指标' rows (指标名称 | 指标值 | ...) as name -> value; empty when absent."""
    out: dict[str, str] = {}
    for line in lines:
        cells = _cells(line) if line.strip().startswith("|") else []
        if len(cells) >= 2 and not _is_separator(cells):
            out.setdefault(_norm(cells[0]), cells[1].strip())
    return out


def parse_flagperf(text: str, source: str = "<text>", *, chips_per_board: int | None = None) -> dict[str, Any]:
    lines = text.splitlines()
    head = _find_header(lines)
    if head is None:
        raise AccelbenchError(f"{source}: no FlagPerf performance table (header "
                              f"'配置 | fix_hp | token/p/s | loss | mem | acc(MMMU) | MFU') found")
    if head + 1 >= len(lines) or not _is_separator(_cells(lines[head + 1])):
        raise AccelbenchError(f"{source}:{head + 2}: expected the table's '| --- |' separator under its header")
    rows: list[dict[str, Any]] = []
    for i in range(head + 2, len(lines)):
        line = lines[i]
        if not line.strip().startswith("|"):
            break  # the table ends at the first line that is not a table row
        where = f"{source}:{i + 1}"
        cells = _cells(line)
        if len(cells) != len(HEADER):
            raise AccelbenchError(f"{where}: performance row has {len(cells)} cells, expected {len(HEADER)} "
                                  f"({' | '.join(HEADER)})")
        config, fix_hp, tps, loss, mem, acc, mfu = cells
        used, total = _memory(mem, where)
        raw = _cells(line, translate=False)  # the config text as published (full-width parentheses kept)
        rows.append({
            **_config(config, where), "config": raw[0] if len(raw) == len(cells) else config, "fix_hp": None if fix_hp in {NA, ""} else fix_hp,
            "tokens_per_s_per_proc": _number(tps, "token/p/s", where), "loss": _number(loss, "loss", where),
            "mem_used_gib": used, "mem_total_gib": total,
            # acc(MMMU) is published in percent without a % sign; stored as a 0..1 fraction like result.json
            "mmmu_accuracy": _number(acc, "acc(MMMU)", where, percent=True),
            "mfu": _number(mfu, "MFU", where, percent=True), "line": i + 1,
        })
    if not rows:
        raise AccelbenchError(f"{source}:{head + 1}: the performance table has no rows")
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["stage"] in stages:
            raise AccelbenchError(f"{source}:{r['line']}: a second {r['stage']} row (first on line "
                                  f"{stages[r['stage']]['line']}); keep one row per stage")
        stages[r["stage"]] = r
    general = _general_metrics(lines)
    heading = next((ln for ln in lines if ln.startswith("### ")), "")
    vendor = heading[4:].split()[0] if heading[4:].split() else None
    device_full = _text(general.get("硬件设备简称"))
    device = rows[0]["device"] or device_full
    mpe = re.search(r"seqlength.*?默认为\s*(\d+)", text)
    if chips_per_board is None:
        names = f"{device or ''} {device_full or ''}"
        chips_per_board = next((n for pat, n in _CHIPS_PER_BOARD if pat.search(names)), 1)
    return {
        "schema": SCHEMA, "source": source, "vendor": vendor, "device": device, "device_full": device_full,
        "model": _text(general.get("模型")), "dtype": _text(general.get("数据精度")),
        "MPE": int(mpe.group(1)) if mpe else None, "GBS": None,  # the pages state LBS per config file only
        "random_weights": False,  # published runs train the real checkpoints
        "device_count": rows[0]["device_count"], "nnodes": rows[0]["nnodes"],
        "nproc_per_node": rows[0]["nproc_per_node"],
        "accounting": {"mfu_formula": "flagperf", "chips_per_board": chips_per_board,
                       "basis": "per card" if chips_per_board > 1 else "per device"},
        "stages": stages, "rows": rows,
    }


def import_flagperf(path: str | Path, *, chips_per_board: int | None = None) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AccelbenchError(f"{path} does not exist: give a FlagPerf case README (Markdown)") from None
    except UnicodeDecodeError as exc:
        raise AccelbenchError(f"{path} is not UTF-8 text ({exc.reason})") from None
    return parse_flagperf(text, str(path), chips_per_board=chips_per_board)


def is_import(obj: Any) -> bool:
    return isinstance(obj, dict) and str(obj.get("schema", "")) == SCHEMA
