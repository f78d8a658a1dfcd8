"""Figures from a (slimmed) profile trace that the run's summary.json does not hold, for docs/performance.md:
    python benchmarks/gpu/trace_facts.py LABEL.trace.json.gz [--steps 2] > facts.json
- per trainer phase, on the host thread that runs it: the innermost host activity (an op, a runtime call, or the
  phase name itself for Python between ops) and the number of top-level ops;
- per collective kernel kind on the traced device: count, total and median duration;
- the compute side's idle time by phase and cause, as accelbench.train.profiling.device_timeline computes it now
  (a summary.json written by an older version may split it a little differently);
- the queued part of it by the communication kernel that ended within 50 µs before the compute kernel that ended
  the gap (what the device waited for);
- the stretch of each forward before the first compiled decoder layer's first kernel (the vision tower, the
  projector and the image merge): its span, and how long a compute or a collective kernel ran within it;
- how much longer GEMMs ran while a collective kernel (or a copy to or from pinned host memory) ran beside them
  for nearly all their time, than GEMMs of the same kernel and grid ran with neither beside them (medians)."""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
from typing import Any

from accelbench.errors import ConfigError
from accelbench.train import profiling as P


def phase_host(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    segments = P._innermost_segments(events)
    out: dict[str, Any] = {}
    for phase in ("forward", "backward", "optimizer_step"):
        spans = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == P.PHASE_PREFIX + phase]
        if not spans:
            continue
        tid = spans[0].get("tid")
        activity: dict[str, float] = {}
        top_level = 0
        host = sorted((e for e in events if e.get("tid") == tid and e.get("cat") in P.HOST_CATS and "dur" in e),
                      key=lambda e: (e["ts"], -e["dur"]))
        for span in spans:
            a, b = span["ts"], span["ts"] + span["dur"]
            P._host_activity(segments[tid], a / 1e6, b / 1e6, activity)
            end = a
            for e in host:
                if e is not span and a <= e["ts"] < b and e["ts"] >= end:
                    top_level, end = top_level + 1, e["ts"] + e["dur"]
        out[phase] = {"host_s_per_step": sum(activity.values()) / steps, "top_level_ops_per_step": top_level / steps,
                      "innermost_s_per_step": {k[:80]: round(v / steps, 4) for k, v in
                                               sorted(activity.items(), key=lambda kv: -kv[1])[:10]}}
    return out


def collectives(kernels: list[P.Kernel], steps: int) -> dict[str, Any]:
    kinds: dict[str, list[float]] = {}
    for k in kernels:
        if P.category(k.name) == "communication":
            kinds.setdefault(k.name.split("(")[0], []).append(k.end - k.start)
    return {name: {"per_step": len(d) / steps, "s_per_step": sum(d) / steps, "median_ms": statistics.median(d) * 1e3}
            for name, d in sorted(kinds.items())}


def queued_by_wait(kernels: list[P.Kernel], steps: int) -> dict[str, float]:
    comm = sorted((k for k in kernels if P.category(k.name) == "communication"), key=lambda k: k.end)
    ends = [k.end for k in comm]
    out: dict[str, float] = {}
    for k, idle_from, _ in P.idle_gaps([k for k in kernels if P.category(k.name) != "communication"]):
        late = P.launched_late(k, idle_from)
        queued = k.start - idle_from - late if late is not None else 0.0
        if queued > 0:
            i = bisect.bisect_right(ends, k.start) - 1
            just_before = i >= 0 and k.start - ends[i] < 50e-6
            key = comm[i].name.split("(")[0] if just_before else "no collective just before"
            out[key] = out.get(key, 0.0) + queued / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _busy(kernels: list[P.Kernel], until: float) -> float:
    """Time before ``until`` in which at least one of ``kernels`` (sorted by start) ran."""
    busy, end = 0.0, float("-inf")
    for k in kernels:
        if k.start >= until:
            break
        start, stop = max(k.start, end), min(k.end, until)
        busy, end = busy + max(0.0, stop - start), max(end, stop)
    return busy


def before_decoder(kernels: list[P.Kernel], steps: int) -> dict[str, float]:
    """Per step: the forward's first kernel to the first Inductor (``triton``) kernel, which is the first compiled
    decoder layer's."""
    forwards: dict[float | None, list[P.Kernel]] = {}
    for k in kernels:
        if k.phase == "forward":
            forwards.setdefault(k.window, []).append(k)
    span = compute = comm = 0.0
    for ks in forwards.values():
        ks.sort(key=lambda k: k.start)
        first = next((k.start for k in ks if k.name.startswith("triton")), None)
        if first is None:
            continue
        span += first - ks[0].start
        compute += _busy([k for k in ks if P.category(k.name) != "communication"], first)
        comm += _busy([k for k in ks if P.category(k.name) == "communication"], first)
    return {"span_s_per_step": span / steps, "compute_busy_s_per_step": compute / steps,
            "collective_s_per_step": comm / steps}


def _overlap(intervals: list[tuple[float, float]], a: float, b: float) -> float:
    """Length of [a, b] covered by ``intervals`` (sorted by start, non-overlapping enough for a sum)."""
    i, covered = max(bisect.bisect_left(intervals, (a,)) - 1, 0), 0.0
    while i < len(intervals) and intervals[i][0] < b:
        covered += max(0.0, min(b, intervals[i][1]) - max(a, intervals[i][0]))
        i += 1
    return covered


def gemms_beside(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    device = P._device(events)
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("pid") == device and "dur" in e]
    beside = {kind: sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if name in e["name"])
              for kind, name in (("all-gather", "AllGather"), ("reduce-scatter", "ReduceScatter"))}
    beside["host copy"] = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                                 if e.get("cat") == "gpu_memcpy" and "Pinned" in e.get("name", "") and "dur" in e)
    shapes: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    for e in kernels:
        if e["name"].startswith("nvjet") and e["dur"] > 0:
            a, b = e["ts"], e["ts"] + e["dur"]
            shares = {k: _overlap(v, a, b) / e["dur"] for k, v in beside.items()}
            shapes.setdefault((e["name"], str(e.get("args", {}).get("grid"))), []).append((e["dur"], shares))
    ratios: dict[str, list[float]] = {k: [] for k in beside}
    excess = dict.fromkeys(beside, 0.0)
    for runs in shapes.values():
        alone = [d for d, shares in runs if max(shares.values()) < 0.02]
        if len(alone) < 3:
            continue
        base = statistics.median(alone)
        for d, shares in runs:
            for kind, share in shares.items():
                if share > 0.9 and all(v < 0.02 for k, v in shares.items() if k != kind):
                    ratios[kind].append(d / base)
                    excess[kind] += (d - base) / 1e6 / steps
    return {kind: {"gemms": len(r), "median_time_over_alone": round(statistics.median(r), 3),
                   "excess_s_per_step": round(excess[kind], 4)} for kind, r in ratios.items() if r}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=2, help="profiled steps in the trace")
    a = p.parse_args()
    try:
        events = P.read_trace(a.trace)
    except ConfigError as exc:
        p.error(str(exc))
    kernels, _ = P._kernel_phases(events, P._device(events))
    timeline = P.device_timeline(events, steps=a.steps)
    print(json.dumps({"trace": a.trace.split("/")[-1], "phase_host": phase_host(events, a.steps),
                      "idle_s_by_cause": timeline.get("compute_idle_s_by_cause", {}),
                      "launched_late_host_activity_s": timeline.get("launched_late_host_activity_s", {}),
                      "collectives": collectives(kernels, a.steps),
                      "queued_s_by_what_ended_just_before": queued_by_wait(kernels, a.steps),
                      "before_the_first_decoder_layer": before_decoder(kernels, a.steps),
                      "gemms_beside": gemms_beside(events, a.steps)}, indent=1))


if __name__ == "__main__":
    main()
