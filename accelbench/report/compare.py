"""`accelbench compare`: runs (and imported FlagPerf pages) side by side, one row per run and stage,
in the layout of FlagPerf's performance table, with ratios against a baseline run.

A ratio is only meaningful when the runs measure the same work the same way, so differences in
global batch, sequence cap, dtype, random vs real weights, or accounting basis are reported as
warnings before the table (and in JSON as `warnings`) rather than silently tabulated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError
from .flagperf_import import import_flagperf, is_import
from .markdown import GIB, NA, device_label, fix_hp
from .result import RESULT, read_result

COLUMNS = ["#", "run", "config", "stage", "fix_hp", "token/p/s", "token/p/s vs base", "loss", "mem",
           "acc(MMMU)", "MFU", "MFU vs base"]


@dataclass
class StageFigures:
    fix_hp: str | None
    tokens_per_s_per_proc: float | None
    loss: float | None
    mem_used_gib: float | None
    mem_total_gib: float | None
    mmmu_accuracy: float | None
    mfu: float | None  # accelbench's own accounting (PaLM, real lengths); None for imports
    mfu_flagperf: float | None  # FlagPerf's k*N*tokens/s/peak
    GBS: int | None
    MPE: int | None
    dtype: str | None


@dataclass
class Entry:
    label: str
    source: str
    kind: str  # "run" or "flagperf"
    device: str
    device_count: int | None
    shape: str  # NNODESxNPROC
    random_weights: bool | None
    basis: str  # normalised accounting basis: per device / per chip / per card
    chips_per_board: int
    stages: dict[str, StageFigures] = field(default_factory=dict)

    @property
    def config(self) -> str:
        return f"{self.device} x {self.device_count if self.device_count is not None else '?'} ({self.shape})"


def _basis(raw: str | None, chips: int) -> str:
    """One chip per board makes per chip, per card and per device the same thing."""
    if chips <= 1:
        return "per device"
    return "per chip" if raw and "chip" in raw else "per card"


def _entry_from_result(result: dict[str, Any], source: str) -> Entry:
    env, ps = result["environment"], result["parallel_strategy"]
    hw = env["hardware"]
    chips = int(hw.get("chips_per_board") or 1)
    stages: dict[str, StageFigures] = {}
    dtypes = []
    for stage, e in result["stages"].items():
        m, plan, batch = e.get("metrics") or {}, e.get("plan") or {}, e.get("batch") or {}
        dtypes.append(plan.get("dtype"))
        used = m.get("mem_peak_reserved") or m.get("mem_rss_peak")
        total = m.get("mem_device_total")
        mmmu = result.get("mmmu") or {}
        stages[stage] = StageFigures(
            fix_hp=None if fix_hp(result, stage) == NA else fix_hp(result, stage),
            tokens_per_s_per_proc=m.get("tokens_per_s_per_proc"), loss=m.get("loss_last"),
            mem_used_gib=used / GIB if used else None, mem_total_gib=total / GIB if total else None,
            mmmu_accuracy=mmmu.get("accuracy") if stage == "finetune" else None,
            mfu=m.get("mfu"), mfu_flagperf=m.get("mfu_flagperf"),
            GBS=batch.get("GBS"), MPE=batch.get("MPE"), dtype=plan.get("dtype"),
        )
    peak_basis = next((p.get("basis") for p in hw.get("peak_flops", []) if p.get("dtype") in dtypes), None)
    return Entry(
        label=Path(result.get("run_dir") or source).name, source=source, kind="run", device=device_label(result),
        device_count=ps.get("world_size"), shape=f"{ps['nnodes']}x{ps['nproc_per_node']}",
        random_weights=bool(result["model"].get("random_weights")), basis=_basis(peak_basis, chips),
        chips_per_board=chips, stages=stages,
    )


def _entry_from_import(imp: dict[str, Any], source: str) -> Entry:
    acc = imp.get("accounting") or {}
    chips = int(acc.get("chips_per_board") or 1)
    stages = {
        stage: StageFigures(
            fix_hp=r.get("fix_hp"), tokens_per_s_per_proc=r.get("tokens_per_s_per_proc"), loss=r.get("loss"),
            mem_used_gib=r.get("mem_used_gib"), mem_total_gib=r.get("mem_total_gib"),
            mmmu_accuracy=r.get("mmmu_accuracy"), mfu=None, mfu_flagperf=r.get("mfu"),
            GBS=imp.get("GBS"), MPE=imp.get("MPE"), dtype=imp.get("dtype"),
        )
        for stage, r in imp["stages"].items()
    }
    return Entry(
        label=" ".join(x for x in ("FlagPerf", imp.get("vendor"), imp.get("device")) if x),
        source=source, kind="flagperf", device=imp.get("device") or "?", device_count=imp.get("device_count"),
        shape=f"{imp.get('nnodes') or '?'}x{imp.get('nproc_per_node') or '?'}",
        random_weights=bool(imp.get("random_weights", False)), basis=_basis(acc.get("basis"), chips),
        chips_per_board=chips, stages=stages,
    )


def load_entry(path: str | Path) -> Entry:
    """A run directory, a result.json, a JSON file from `import-flagperf`, or a FlagPerf README itself."""
    p = Path(path)
    if p.is_dir():
        return _entry_from_result(read_result(p), str(p))
    if not p.exists():
        raise AccelbenchError(f"{p} does not exist: give a run directory or an `import-flagperf` JSON file")
    if p.name == RESULT:
        return _entry_from_result(read_result(p.parent), str(p.parent))
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if p.suffix.lower() in {".md", ".txt", ".markdown"}:
            return _entry_from_import(import_flagperf(p), str(p))
        raise AccelbenchError(f"{p} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if is_import(data):
        return _entry_from_import(data, str(p))
    if isinstance(data, dict) and str(data.get("schema", "")).startswith("accelbench.result/"):
        return _entry_from_result(data, str(p))
    raise AccelbenchError(f"{p} is neither an accelbench result nor an `accelbench import-flagperf` file "
                          "(no 'schema' of accelbench.result/N or accelbench.flagperf-import/1)")


# -- what changes the meaning of the comparison ---------------------------------------------------
_WHY = {
    "GBS": "global batch (GBS)", "MPE": "sequence cap (MPE)", "dtype": "dtype",
}
_CONSEQUENCE = {
    "GBS": "per-step work and convergence differ, so token/p/s, loss and MFU are not like for like",
    "MPE": "sequence lengths (and attention cost) differ",
    "dtype": "different precisions run at different peaks and speeds",
}


def _tag(i: int, e: Entry) -> str:
    return f"[{i}] {e.label}"


def comparison_warnings(entries: list[Entry]) -> list[str]:
    warnings: list[str] = []
    stages = list(dict.fromkeys(s for e in entries for s in e.stages))
    for key in ("GBS", "MPE", "dtype"):
        for stage in stages:
            have = [(i, e, getattr(e.stages[stage], key)) for i, e in enumerate(entries, 1) if stage in e.stages]
            known = {v for _, _, v in have if v is not None}
            if len(known) > 1:
                warnings.append(f"{_WHY[key]} differs in {stage}: "
                                + ", ".join(f"{_tag(i, e)} {v if v is not None else 'unknown'}" for i, e, v in have)
                                + f"; {_CONSEQUENCE[key]}")
            elif known and len(have) > 1 and any(v is None for _, _, v in have):
                warnings.append(f"{_WHY[key]} in {stage} is not stated by "
                                + ", ".join(_tag(i, e) for i, e, v in have if v is None)
                                + f" (others: {next(iter(known))}): cannot check that the runs match")
    weights = {e.random_weights for e in entries}
    if len(weights) > 1:
        warnings.append("random vs real weights: "
                        + ", ".join(f"{_tag(i, e)} {'random' if e.random_weights else 'real'}"
                                    for i, e in enumerate(entries, 1))
                        + "; loss and MMMU of random weights mean nothing, and throughput may differ")
    bases = {e.basis for e in entries}
    if len(bases) > 1:
        warnings.append("accounting basis differs: "
                        + ", ".join(f"{_tag(i, e)} {e.basis} ({e.chips_per_board} chip(s) per board)"
                                    for i, e in enumerate(entries, 1))
                        + "; token/p/s and MFU per chip are not per card (a multi-chip card counts once per card)")
    return warnings


# -- the table ----------------------------------------------------------------------------------
def _ratio(x: float | None, base: float | None) -> float | None:
    return x / base if x is not None and base else None


def compare(paths: list[str | Path], baseline: int = 1) -> dict[str, Any]:
    if len(paths) < 1:
        raise AccelbenchError("give at least one run directory to compare")
    entries = [load_entry(p) for p in paths]
    if not 1 <= baseline <= len(entries):
        raise AccelbenchError(f"--baseline {baseline} is out of range: give 1..{len(entries)} (the run's position)")
    base = entries[baseline - 1]
    # One MFU formula per column: published rows only have FlagPerf's k*N*tokens/s/peak, so a table
    # that holds any of them uses that formula for every row.
    formula = "flagperf" if any(e.kind == "flagperf" for e in entries) else "accelbench"

    def mfu(f: StageFigures) -> float | None:
        return f.mfu_flagperf if formula == "flagperf" else f.mfu

    rows = []
    for i, e in enumerate(entries, 1):
        for stage, f in e.stages.items():
            b = base.stages.get(stage)
            rows.append({
                "index": i, "run": e.label, "source": e.source, "kind": e.kind, "config": e.config, "stage": stage,
                "fix_hp": f.fix_hp, "tokens_per_s_per_proc": f.tokens_per_s_per_proc,
                "tokens_per_s_ratio": _ratio(f.tokens_per_s_per_proc, b.tokens_per_s_per_proc if b else None),
                "loss": f.loss, "mem_used_gib": f.mem_used_gib, "mem_total_gib": f.mem_total_gib,
                "mmmu_accuracy": f.mmmu_accuracy, "mfu": mfu(f), "mfu_ratio": _ratio(mfu(f), mfu(b) if b else None),
                "GBS": f.GBS, "MPE": f.MPE, "dtype": f.dtype, "random_weights": e.random_weights, "basis": e.basis,
            })
    return {
        "schema": "accelbench.compare/1", "baseline": baseline, "baseline_run": base.label, "mfu_formula": formula,
        "warnings": comparison_warnings(entries), "rows": rows,
    }


def _f(x: float | None, fmt: str) -> str:
    return NA if x is None else fmt.format(x)


def _mem(used: float | None, total: float | None) -> str:
    return NA if not used or not total else f"{used:.2f}/{total:.0f}"


def render_compare(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if report["warnings"]:
        lines.append("WARNING: these runs differ in ways that change the meaning of the comparison:")
        lines += [f"WARNING:   - {w}" for w in report["warnings"]]
        lines.append("")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in report["rows"]:
        cells = [
            str(r["index"]) + (" (base)" if r["index"] == report["baseline"] else ""), r["run"], r["config"],
            r["stage"], r["fix_hp"] or NA, _f(r["tokens_per_s_per_proc"], "{:.2f}"),
            _f(r["tokens_per_s_ratio"], "{:.2f}x"), _f(r["loss"], "{:.4f}"), _mem(r["mem_used_gib"], r["mem_total_gib"]),
            _f(None if r["mmmu_accuracy"] is None else r["mmmu_accuracy"] * 100, "{:.1f}"),
            _f(None if r["mfu"] is None else r["mfu"] * 100, "{:.2f}%"), _f(r["mfu_ratio"], "{:.2f}x"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    formula = ("FlagPerf's k*N*tokens/s/peak for every row (published rows have no other)"
               if report["mfu_formula"] == "flagperf" else "accelbench's (analytic model FLOPs at real lengths)")
    lines += ["", f"baseline: [{report['baseline']}] {report['baseline_run']}; ratios = row / baseline's same stage; "
                  f"MFU: {formula}"]
    return "\n".join(lines) + "\n"
