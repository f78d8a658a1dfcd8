"""PNG plots of a run (loss, throughput, memory, MMMU per discipline), written into RUN_DIR/plots/.

Each plot reports how many points it drew per series, counted from the drawn matplotlib artists
(not from the input), so tests can hold the figures to events.jsonl.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError

GIB = 2**30
EVENTS = "events.jsonl"
MMMU = "mmmu.json"
PLOTS_DIR = "plots"
WARMUP_LABEL = "warm-up (excluded)"
_STAGE_COLOURS = {"pretrain": "tab:blue", "finetune": "tab:green"}
_WARMUP_COLOUR = "tab:orange"


@dataclass
class Plot:
    name: str  # loss, throughput, memory, mmmu
    title: str
    path: Path
    points: dict[str, int] = field(default_factory=dict)  # series label -> points drawn
    legend: list[str] = field(default_factory=list)  # legend entries as drawn, all panels

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "path": str(self.path), "points": dict(self.points),
                "legend": list(self.legend)}


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Step records of events.jsonl (other event kinds, if any, are skipped); [] when there is no file."""
    path = Path(run_dir) / EVENTS
    if not path.exists():
        return []
    steps = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            # a run killed mid-write may leave a torn last line; anything else is corruption
            if lineno == len(lines):
                break
            raise AccelbenchError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(event, dict) and {"stage", "step", "time_s"} <= event.keys():
            steps.append(event)
    return steps


def steps_by_stage(events: list[dict[str, Any]], result: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """Steps grouped by stage (in the result's stage order), each with a reliable `warmup` flag.

    The flag in events.jsonl may be False for every step, because the trainer decides warm-up only
    after the stage ends; result.json's `warmup_steps_excluded` (the first N steps) then decides. A step in
    which torch.compile made a graph (`compiled`) is left out of the steady state too (unless every step after
    warm-up compiled, `compile_steps_excluded` 0), so it is drawn with the warm-up steps.
    """
    order = list((result or {}).get("stages", {}))
    grouped: dict[str, list[dict]] = {s: [] for s in order}
    for e in events:
        grouped.setdefault(e["stage"], []).append(e)
    for stage, steps in grouped.items():
        steps.sort(key=lambda e: e["step"])
        metrics = ((result or {}).get("stages", {}).get(stage) or {}).get("metrics") or {}
        n_warm = int(metrics.get("warmup_steps_excluded") or 0)
        compiles_excluded = not metrics or bool(metrics.get("compile_steps_excluded"))
        for i, e in enumerate(steps):
            e["warmup"] = bool(e.get("warmup")) or i < n_warm or (compiles_excluded and bool(e.get("compiled")))
    return {s: v for s, v in grouped.items() if v}


def read_mmmu_disciplines(run_dir: str | Path, result: dict[str, Any] | None = None) -> dict[str, float]:
    """Accuracy (0..1) per MMMU discipline: mmmu.json's per_discipline, else result.json's copy."""
    path = Path(run_dir) / MMMU
    per: dict[str, Any] = {}
    if path.exists():
        try:
            per = json.loads(path.read_text(encoding="utf-8")).get("per_discipline") or {}
        except (json.JSONDecodeError, AttributeError):
            raise AccelbenchError(f"{path} is not a valid MMMU report (JSON object with per_discipline)") from None
    if not per and result and result.get("mmmu"):
        per = result["mmmu"].get("per_discipline") or {}
    # mmmu.json holds {correct, total, accuracy}; result.json holds the accuracy alone
    return {k: float(v["accuracy"] if isinstance(v, dict) else v) for k, v in per.items()
            if (v.get("accuracy") if isinstance(v, dict) else v) is not None}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _stage_axes(plt: Any, stages: list[str], ylabel: str, title: str) -> tuple[Any, list[Any]]:
    """One panel per stage: the stages' scales differ by an order of magnitude (projector vs full LLM)."""
    fig, axes = plt.subplots(1, len(stages), figsize=(5.2 * len(stages), 3.6), squeeze=False)
    fig.suptitle(title)
    for ax, stage in zip(axes[0], stages):
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return fig, list(axes[0])


def _legend_below(ax: Any) -> None:
    # below the panel, so it never hides a point (a 'best' legend inside still can on noisy CPU steps)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)


def _save(plt: Any, fig: Any, plot: Plot) -> None:
    plot.legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(plot.path, format="png", dpi=100, bbox_inches="tight")  # "tight" keeps the legends below
    plt.close(fig)


def _count(line: Any) -> int:
    return len(line.get_xdata())


def plot_loss(plt: Any, by_stage: dict[str, list[dict]], out: Path) -> Plot:
    fig, axes = _stage_axes(plt, list(by_stage), "loss", "Training loss per step")
    plot = Plot("loss", "Loss per step", out / "loss.png")
    for ax, (stage, steps) in zip(axes, by_stage.items()):
        (line,) = ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], marker="o", ms=3,
                          color=_STAGE_COLOURS.get(stage), label=f"{stage} loss")
        plot.points[stage] = _count(line)
        _legend_below(ax)
    _save(plt, fig, plot)
    return plot


def plot_throughput(plt: Any, by_stage: dict[str, list[dict]], out: Path,
                    steady: dict[str, float | None]) -> Plot:
    fig, axes = _stage_axes(plt, list(by_stage), "tokens/s per process", "Throughput per step")
    plot = Plot("throughput", "Tokens/s per process per step (warm-up marked, excluded from the steady figure)",
                out / "throughput.png")
    for ax, (stage, steps) in zip(axes, by_stage.items()):
        hot = [e for e in steps if not e["warmup"]]
        warm = [e for e in steps if e["warmup"]]
        (line,) = ax.plot([e["step"] for e in hot], [e["tokens_per_s_per_proc"] for e in hot], marker="o", ms=3,
                          color=_STAGE_COLOURS.get(stage), label=f"{stage} (steady)")
        plot.points[f"{stage} steady"] = _count(line)
        # warm-up: distinct marker and colour, never joined to the steady line
        (wline,) = ax.plot([e["step"] for e in warm], [e["tokens_per_s_per_proc"] for e in warm], linestyle="none",
                           marker="x", ms=7, mew=2, color=_WARMUP_COLOUR, label=WARMUP_LABEL)
        plot.points[f"{stage} warm-up"] = _count(wline)
        if steady.get(stage):
            ax.axhline(steady[stage], color="grey", linestyle="--", linewidth=1,
                       label=f"steady {steady[stage]:.1f} (result.json)")
        ax.set_ylim(bottom=0)
        _legend_below(ax)
    _save(plt, fig, plot)
    return plot


def plot_memory(plt: Any, by_stage: dict[str, list[dict]], out: Path, totals: dict[str, int | None]) -> Plot:
    fig, axes = _stage_axes(plt, list(by_stage), "GiB", "Memory per step (peak reserved; RSS on CPU)")
    plot = Plot("memory", "Memory per step against the device total", out / "memory.png")
    for ax, (stage, steps) in zip(axes, by_stage.items()):
        gib = [(e.get("mem_reserved") or e.get("rss") or 0) / GIB for e in steps]
        (line,) = ax.plot([e["step"] for e in steps], gib, marker="o", ms=3, color=_STAGE_COLOURS.get(stage),
                          label=f"{stage} peak reserved (max {max(gib):.2f} GiB)")
        plot.points[stage] = _count(line)
        total = totals.get(stage)
        if total:
            ax.axhline(total / GIB, color="tab:red", linestyle="--", label=f"device total {total / GIB:.0f} GiB")
        ax.set_ylim(bottom=0)
        _legend_below(ax)
    _save(plt, fig, plot)
    return plot


def plot_mmmu(plt: Any, per_discipline: dict[str, float], out: Path, overall: float | None) -> Plot:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    plot = Plot("mmmu", "MMMU (val) accuracy per discipline", out / "mmmu.png")
    names = list(per_discipline)
    bars = ax.bar(range(len(names)), [v * 100 for v in per_discipline.values()], color="tab:purple")
    plot.points["disciplines"] = len(bars.patches)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(" and ", " &\n") for n in names], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if overall is not None:
        ax.axhline(overall * 100, color="grey", linestyle="--", label=f"overall {overall * 100:.1f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title("MMMU (val) accuracy per discipline")
    _save(plt, fig, plot)
    return plot


def make_plots(run_dir: str | Path, result: dict[str, Any]) -> list[Plot]:
    """Write every plot the run has data for; a run without events or MMMU simply has fewer plots."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    by_stage = steps_by_stage(read_events(run_dir), result)
    metrics = {s: (e.get("metrics") or {}) for s, e in result.get("stages", {}).items()}
    plt = _pyplot()
    plots: list[Plot] = []
    if by_stage:
        plots.append(plot_loss(plt, by_stage, out))
        plots.append(plot_throughput(plt, by_stage, out,
                                     {s: metrics.get(s, {}).get("tokens_per_s_per_proc") for s in by_stage}))
        plots.append(plot_memory(plt, by_stage, out, {s: metrics.get(s, {}).get("mem_device_total") for s in by_stage}))
    per = read_mmmu_disciplines(run_dir, result)
    if per:
        plots.append(plot_mmmu(plt, per, out, (result.get("mmmu") or {}).get("accuracy")))
    return plots
