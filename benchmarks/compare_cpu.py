"""accelbench vs the HF Trainer + DeepSpeed peer on the same model, data and settings (CPU, ``tiny``).

Each repeat runs both paths as fresh processes, alternating which goes first (A/B, B/A, ...), so slow
drift of a shared machine lands on both; the table reports every run and the median of the repeats.

    python benchmarks/compare_cpu.py                      # finetune, 20 steps, 4 repeats (~3 min on 2 cores)
    python benchmarks/compare_cpu.py --stage pretrain --steps 30 --repeats 5

Throughput is real (non-pad) tokens per second per process over the steady steps (accelbench's
warm-up rule, ``metrics.warmup_steps``), from each path's own per-step timing; ``wall s`` is the whole
process (imports, data, model build, engine start) and is shown for information only.

``benchmarks/gpu/compare_peer.py`` reuses ``run_accelbench``/``run_peer``/``print_table`` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT / "benchmarks" / "hf_peer.py"
ACCELBENCH = "accelbench"
PEER = "hf-trainer"


@dataclass
class Settings:
    """What both paths are given."""
    case: str = "tiny"
    stage: str = "finetune"
    steps: int = 20
    mbs: int | None = None
    gas: int = 1
    seq: int = 2048
    nproc: int = 1
    seed: int = 0
    data: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    accelbench_args: tuple[str, ...] = ()  # e.g. ("--without", "packing") for an ablation run
    ds_config: str | None = None  # a DeepSpeed JSON both paths merge over the shared config (the same ZeRO tuning)
    peer_args: tuple[str, ...] = ()  # set from accelbench's resolved plan (same_zero_config)
    peer_options: tuple[str, ...] = ()  # the peer's own rounding variant, e.g. ("--attn", "eager")


@dataclass
class RunResult:
    path: str
    repeat: int
    summary: dict[str, Any]
    wall_s: float

    @property
    def tps(self) -> float:
        return float(self.summary["tokens_per_s_per_proc"])

    @property
    def loss(self) -> float:
        return float(self.summary["loss_last"])


def child_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # CPU: the same threads per process for both (accelbench sets this itself; torchrun would set 1).
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // s.nproc))
    env.update(s.extra_env)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        # own process group: a timeout must take the launcher's ranks down too, or they keep the devices busy
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException:  # timeout, Ctrl-C, or SIGTERM (see stop_on_sigterm): take the ranks down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return wall


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so a running path's process group is killed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_accelbench(s: Settings, out: Path, repeat: int, timeout: float = 1800, label: str = ACCELBENCH) -> RunResult:
    out = out / f"{label.replace(' ', '_').replace('-', '')}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "accelbench.cli", "run", "--case", s.case, "--stages", s.stage,
           "--steps", str(s.steps), "--gas", str(s.gas), "--seq", str(s.seq), "--seed", str(s.seed),
           "--nproc-per-node", str(s.nproc), "--no-eval", "--quiet", "--out", str(out / "run")]
    if s.mbs is not None:
        cmd += ["--mbs", str(s.mbs)]
    if s.data:
        cmd += ["--data", s.data]
    if s.ds_config:
        cmd += ["--ds-config", s.ds_config]
    cmd += list(s.accelbench_args)
    try:
        wall = _run(cmd, child_env(s), out / "log.txt", timeout)
    except subprocess.TimeoutExpired:
        summary = summary_of_finished_steps(out / "run" / "events.jsonl", s)
        if summary is None:
            raise
        summary["cut_off"] = (f"stopped at the path timeout ({timeout:.0f} s) after its last step: figures from "
                              f"its events.jsonl, no plan")
        return RunResult(label, repeat, summary, timeout)
    summary = json.loads((out / "run" / s.stage / "summary.json").read_text())
    summary["_events"] = str(out / "run" / "events.jsonl")
    plan = json.loads((out / "run" / "result.json").read_text())["stages"][s.stage]["plan"]
    summary["_plan"] = {k: plan.get(k) for k in ("LBS", "attn_implementation", "packed", "kernels", "loss",
                                                  "recompute_layers", "micro_batch_tokens", "zero_stage", "zero3_buckets",
                                                  "without")}
    return RunResult(label, repeat, summary, wall)


def summary_of_finished_steps(events: Path, s: Settings) -> dict[str, Any] | None:
    """The stage's summary from its step records, for a run stopped after its last step (while it saved its
    outputs, say), so that steps measured in full are not lost; None unless every step was recorded."""
    from accelbench.cases import get_preset
    from accelbench.train.metrics import read_step_records, summarize

    records = read_step_records(events, s.stage, upto=s.steps) if events.exists() else []
    if len(records) < s.steps:
        return None
    summary = summarize(records, world_size=s.nproc, stage_wall_s=sum(r.time_s for r in records), peak_flops=None,
                        chips_per_board=1, flagperf_params=get_preset(s.case).nominal_params, stage=s.stage,
                        device_total=0)
    summary["tokens_per_s_per_proc_e2e"] = None  # the wall time outside the steps is unknown
    summary["_events"] = str(events)
    return summary


def run_peer(s: Settings, out: Path, repeat: int, timeout: float = 1800, torchrun: bool | None = None) -> RunResult:
    out = out / f"peer-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["--case", s.case, "--stage", s.stage, "--steps", str(s.steps), "--gas", str(s.gas),
            "--seq", str(s.seq), "--seed", str(s.seed), "--quiet", "--out", str(out / "run")]
    if s.mbs is not None:
        args += ["--mbs", str(s.mbs)]
    if s.data:
        args += ["--data", s.data]
    if s.ds_config:
        args += ["--ds-config", s.ds_config]
    args += [*s.peer_options, *s.peer_args]
    if torchrun if torchrun is not None else s.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(s.nproc),
               str(PEER_SCRIPT), *args]
    else:
        cmd = [sys.executable, str(PEER_SCRIPT), *args]
    wall = _run(cmd, child_env(s), out / "log.txt", timeout)
    summary = json.loads((out / "run" / "peer_summary.json").read_text())
    return RunResult(PEER, repeat, summary, wall)


def same_zero_config(s: Settings, accelbench: RunResult) -> Settings:
    """The peer's settings, so that it runs the ZeRO config accelbench's plan resolved: the peer takes the 5e8
    ZeRO-3 buckets and the whole vision tower by default; the planner drops the buckets where they would not fit
    (plan.py), and ``--without`` either lever.  A failed run resolved nothing, so the settings stay those of the
    last run that did."""
    plan = accelbench.summary.get("_plan")
    if not plan:
        return s
    zero3 = plan.get("zero_stage") == 3
    args = ("--llava-zero3-buckets",) if zero3 and plan.get("zero3_buckets") is False else ()
    args += ("--llava-persistence",) if zero3 and plan.get("whole_tower") is False else ()
    return replace(s, peer_args=args)


def attempt(path: str, repeat: int, run: Any) -> RunResult:
    """``run()``, or a result that records the failure (e.g. the peer out of memory) so the other rows print."""
    t0 = time.perf_counter()
    try:
        return run()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        oom = next((ln for ln in lines if "out of memory" in ln.lower()), None)
        return RunResult(path, repeat, {"error": (oom or (lines[-1] if lines else repr(exc)))[:300]},
                         time.perf_counter() - t0)


def run_interleaved(s: Settings, out: Path, repeats: int, *, peer_torchrun: bool | None = None,
                    quiet: bool = False, timeout: float = 1800) -> list[RunResult]:
    """A/B, B/A, A/B, ...: the path that runs first alternates every repeat."""
    results: list[RunResult] = []
    for r in range(repeats):
        order = ("accelbench", "peer") if r % 2 == 0 else ("peer", "accelbench")
        for which in order:
            if which == "accelbench":
                res = attempt(ACCELBENCH, r, lambda: run_accelbench(s, out, r, timeout=timeout))
                s = same_zero_config(s, res)
            else:
                res = attempt(PEER, r, lambda: run_peer(s, out, r, timeout=timeout, torchrun=peer_torchrun))
            results.append(res)
            if not quiet:
                what = (f"FAILED: {res.summary['error']}" if "error" in res.summary else
                        f"{res.tps:8.1f} tok/s/proc, loss {res.loss:.4f}")
                print(f"  repeat {r + 1}/{repeats} {res.path:>10}: {what}, wall {res.wall_s:.1f}s", flush=True)
    return results


def _events(r: RunResult) -> list[dict[str, Any]]:
    """An accelbench run's per-step records (events.jsonl)."""
    return [json.loads(line) for line in Path(r.summary["_events"]).read_text().splitlines() if line.strip()]


def step_series(r: RunResult) -> tuple[list[float], list[int]]:
    """Per-step times and real tokens (all processes) of one run: accelbench's events.jsonl, the peer's summary."""
    if r.path == PEER:
        return list(r.summary["step_times"]), list(r.summary["real_tokens"])
    events = _events(r)
    return [e["time_s"] for e in events], [e["real_tokens"] for e in events]


def step_losses(r: RunResult) -> list[float]:
    """Per-step losses of one run: accelbench's events.jsonl, the peer's summary."""
    if r.path == PEER:
        return [float(x) for x in r.summary.get("losses", [])]
    return [float(e["loss"]) for e in _events(r)]


def best_of_repeats_tps(results: Sequence[RunResult], path: str, world: int) -> float | None:
    """Noise-robust check: both paths train the same batches in the same order, so take each step's fastest
    time over the repeats (the least-disturbed measurement of that batch), then steady tokens / summed time."""
    from accelbench.train.metrics import warmup_steps

    series = [step_series(r) for r in results if r.path == path]
    if not series or any(len(t) != len(series[0][0]) for t, _ in series):
        return None
    n = len(series[0][0])
    warm = warmup_steps(n)
    best = [min(t[i] for t, _ in series) for i in range(warm, n)]
    tokens = sum(series[0][1][warm:])
    return tokens / sum(best) / world


def median_of(results: Sequence[RunResult], path: str, key: str) -> float | None:
    values = [r.summary.get(key) for r in results if r.path == path]
    values = [float(v) for v in values if v is not None]
    return statistics.median(values) if values else None


def print_table(results: Sequence[RunResult], s: Settings, columns: Sequence[tuple[str, str, str]]) -> str:
    """One markdown table: every run, then the medians and the accelbench / peer ratio.

    ``columns``: (header, summary key, format) triples.
    """
    head = ["run", "path", *[c[0] for c in columns], "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]

    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for r in results:
        if "error" in r.summary:
            lines.append(f"| {r.repeat + 1} | {r.path} | failed: {r.summary['error']} |")
            continue
        cells = [str(r.repeat + 1), r.path, *[fmt(r.summary.get(k), f) for _, k, f in columns], f"{r.wall_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for path in (ACCELBENCH, PEER):
        cells = ["median", path, *[fmt(median_of(results, path, k), f) for _, k, f in columns],
                 fmt(statistics.median([r.wall_s for r in results if r.path == path] or [0.0]), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    ratio_cells = []
    for _, k, _f in columns:
        a, p = median_of(results, ACCELBENCH, k), median_of(results, PEER, k)
        ratio_cells.append(f"{a / p:.3f}" if a is not None and p else "n/a")
    lines.append("| ratio | accelbench / peer | " + " | ".join(ratio_cells) + " | |")
    table = "\n".join(lines)
    print(table)
    return table


CPU_COLUMNS = [
    ("tokens/s per process", "tokens_per_s_per_proc", ".1f"),
    ("step s (median)", "step_time_s_median", ".3f"),
    ("padding eff.", "padding_efficiency", ".3f"),
    ("loss after N steps", "loss_last", ".4f"),
    ("peak RSS MiB", "mem_rss_peak_mib", ".0f"),
]


def add_derived(results: Sequence[RunResult]) -> None:
    for r in results:
        rss = r.summary.get("mem_rss_peak")
        r.summary["mem_rss_peak_mib"] = rss / 2**20 if rss else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="tiny")
    p.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mbs", type=int)
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--nproc", type=int, default=1, help="processes per path (peer through torchrun when > 1)")
    p.add_argument("--repeats", type=int, default=4, help="pairs of runs; the first path alternates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="LLaVA-format data folder (default: accelbench's synthetic set)")
    p.add_argument("--out", help="folder for logs and summaries (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    stop_on_sigterm()
    s = Settings(case=a.case, stage=a.stage, steps=a.steps, mbs=a.mbs, gas=a.gas, seq=a.seq, nproc=a.nproc,
                 seed=a.seed, data=a.data)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="accelbench-compare-"))
    print(f"{a.case} {a.stage}: {a.steps} steps x {a.repeats} repeats, {a.nproc} process(es); logs in {out}",
          flush=True)
    results = run_interleaved(s, out, a.repeats)
    failed = [r for r in results if "error" in r.summary]
    if failed:
        for r in failed:
            print(f"{r.path} repeat {r.repeat + 1} failed: {r.summary['error']}", file=sys.stderr)
        return 1
    add_derived(results)
    steady = results[0].summary.get("steady_steps")
    print(f"\nsteady steps per run: {steady} of {a.steps} (warm-up excluded as accelbench's metrics.warmup_steps)")
    print_table(results, s, CPU_COLUMNS)
    a_tps, p_tps = median_of(results, ACCELBENCH, "tokens_per_s_per_proc"), median_of(results, PEER, "tokens_per_s_per_proc")
    print(f"\naccelbench {a_tps:.1f} vs peer {p_tps:.1f} tokens/s per process: ratio {a_tps / p_tps:.3f} "
          f"({'accelbench faster' if a_tps >= p_tps else 'accelbench SLOWER'})")
    a_best, p_best = best_of_repeats_tps(results, ACCELBENCH, a.nproc), best_of_repeats_tps(results, PEER, a.nproc)
    if a_best and p_best:
        print(f"check, per-step best of {a.repeats} repeats: accelbench {a_best:.1f} vs peer {p_best:.1f} "
              f"tokens/s per process: ratio {a_best / p_best:.3f}")
    if a.json:
        write_results_json(a.json, results)
    return 0


def write_results_json(path: str, results: Sequence[RunResult]) -> None:
    """Each run's summary and its per-step losses (the curves the loss check compares)."""
    Path(path).write_text(json.dumps([{"path": r.path, "repeat": r.repeat, "wall_s": r.wall_s,
                                       "step_losses": step_losses(r) if "error" not in r.summary else [],
                                       "summary": r.summary} for r in results], indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
