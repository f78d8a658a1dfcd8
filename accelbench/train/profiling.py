"""``accelbench run --profile A-B``: torch.profiler over optimizer steps A..B of each stage.

Rank 0 writes, per stage, ``profile/summary.txt`` (top operators by device time, or CPU time on a
CPU backend), ``profile/summary.json`` (device time per kernel category as a share of the profiled
wall time: matmul, attention, communication, memory copies, other) and ``profile/trace.json.gz``
(open in chrome://tracing or Perfetto). Every rank profiles, so the ranks stay in step.
"""
from __future__ import annotations

import bisect
import gzip
import json
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

# Kernel-name fragments per category, checked in order (names differ by vendor and library version).
CATEGORIES = (
    ("communication", ("nccl", "allgather", "all_gather", "reduce_scatter", "allreduce", "all_reduce", "gloo")),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    # cuBLAS on Hopper names its GEMMs nvjet_*; CPU profiles name the aten ops
    ("matmul", ("gemm", "matmul", "cutlass", "cublas", "xmma", "nvjet", "aten::mm", "aten::bmm", "addmm")),
    ("memory", ("memcpy", "memset")),
)


PHASE_PREFIX = "accelbench/"  # record_function names the trainer gives its step phases


def parse_profile_steps(text: str | None, steps: int | None = None) -> tuple[int, int] | None:
    """"3" -> (3, 3); "3-4" -> (3, 4); checked against the stage's step count when given."""
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        first, dash, last = text.partition("-")
        span = (int(first), int(last if dash else first))
    except ValueError:
        raise ConfigError(f"--profile {text!r} is not a step range: give N or A-B, e.g. 3-4") from None
    if not 1 <= span[0] <= span[1] or (steps is not None and span[1] > steps):
        raise ConfigError(f"--profile {text!r} is impossible: give steps within 1..{steps or 'the step count'}, "
                          f"first <= last (after warm-up, e.g. 3-4)")
    return span


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """The events of a gzipped chrome trace that torch.profiler exported (``trace.json.gz``)."""
    from ..errors import ConfigError

    try:
        with gzip.open(path, "rt") as fh:
            return json.load(fh).get("traceEvents", [])
    except (OSError, EOFError, ValueError, AttributeError) as exc:  # missing, not gzip, not JSON, not an object
        raise ConfigError(f"{path}: not a readable gzipped chrome trace ({exc}); give a profile's trace.json.gz") \
            from None


def _phase_spans(trace_events: list[dict[str, Any]], cat: str,
                 pid: Any = None) -> dict[str, list[tuple[float, float]]]:
    """The trainer's record_function phases as merged (start, end) seconds, per phase: ``cat``
    ``user_annotation`` for the host, ``gpu_user_annotation`` for the span of the kernels a phase launched
    (one span per stream it launched on, hence the merge); ``pid`` keeps one device's."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in trace_events:
        name = e.get("name", "")
        if (e.get("cat") == cat and name.startswith(PHASE_PREFIX) and "ts" in e and "dur" in e
                and (pid is None or e.get("pid", 0) == pid)):
            start = float(e["ts"]) / 1e6
            spans.setdefault(name.removeprefix(PHASE_PREFIX), []).append((start, start + float(e["dur"]) / 1e6))
    return {phase: _union(v) for phase, v in sorted(spans.items())}


def _device(trace_events: list[dict[str, Any]]) -> Any:
    """The device whose kernels a summary reads (rank 0's trace holds one; keep it to one), None without kernels."""
    return min((e.get("pid", 0) for e in trace_events if e.get("cat") == "kernel" and "ts" in e and "dur" in e),
               default=None)


class Kernel(NamedTuple):
    start: float
    end: float
    phase: str | None
    name: str
    window: float | None  # start of the phase span holding the launch: tells a phase's runs apart
    thread: Any  # the host thread that launched it
    launch_end: float | None  # when the host's launch call returned, None without launch records


def _kernel_phases(trace_events: list[dict[str, Any]], device: Any, cats: tuple[str, ...] = ("kernel",)
                   ) -> tuple[list[Kernel], bool]:
    """Every kernel (or other ``cats`` event) of ``device``, seconds, by start, and whether the trace marks any
    phase at all. The phase is the trainer phase whose host span (``user_annotation``) holds the kernel's
    launch call, matched by correlation id, from any host thread: autograd launches the backward's kernels
    from its own thread, outside the main thread's ``gpu_user_annotation``. Where spans nest, the innermost
    holds it. A trace without launch records falls back to the device-side annotation."""
    host = sorted((start, end, phase) for phase, spans in _phase_spans(trace_events, "user_annotation").items()
                  for start, end in spans)
    annotated = sorted((start, end, phase) for phase, spans
                       in _phase_spans(trace_events, "gpu_user_annotation", pid=device).items() for start, end in spans)
    # correlation id -> (launch call's start, its thread, its end)
    launched = {e["args"]["correlation"]: (float(e["ts"]) / 1e6, e.get("tid"), (e["ts"] + e.get("dur", 0)) / 1e6)
                for e in trace_events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {})}

    def within(t: float, windows: list[tuple[float, float, str]]) -> tuple[str | None, float | None]:
        # the latest-starting span that has not ended at t: the innermost one holding t
        for i in range(bisect.bisect_right(windows, (t, float("inf"), "")) - 1, -1, -1):
            if windows[i][1] >= t:
                return windows[i][2], windows[i][0]
        return None, None

    out = []
    for e in trace_events:
        if e.get("cat") not in cats or "ts" not in e or "dur" not in e or e.get("pid", 0) != device:
            continue
        start = float(e["ts"]) / 1e6
        launch, thread, launch_end = launched.get((e.get("args") or {}).get("correlation"), (None, None, None))
        phase, window = within(launch, host) if launch is not None else within(start, annotated)
        out.append(Kernel(start, start + float(e["dur"]) / 1e6, phase, e.get("name", ""), window, thread, launch_end))
    return sorted(out, key=lambda k: k.start), bool(host or annotated)


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")


def _innermost_segments(trace_events: list[dict[str, Any]]) -> dict[Any, tuple[list[float], list[tuple[float, str]]]]:
    """Per host thread, its time cut into segments named by the innermost host event running (an aten op, a
    CUDA runtime call such as cudaStreamSynchronize, a phase span where Python runs between ops), as
    (segment starts, [(end, name)]) for bisecting; time outside every event is not covered."""
    by_thread: dict[Any, list[tuple[float, float, str]]] = {}
    for e in trace_events:
        if e.get("cat") in HOST_CATS and "ts" in e and "dur" in e:
            start = float(e["ts"]) / 1e6
            by_thread.setdefault(e.get("tid"), []).append((start, start + float(e["dur"]) / 1e6, e.get("name", "")))
    out = {}
    for tid, events in by_thread.items():
        starts: list[float] = []
        ends: list[tuple[float, str]] = []

        def emit(a: float, b: float, name: str) -> None:
            if b > a:
                starts.append(a)
                ends.append((b, name))

        stack: list[tuple[float, str]] = []  # (end, name) of the open events, innermost last
        cursor = 0.0
        for start, end, name in sorted(events, key=lambda e: (e[0], -e[1])):
            while stack and stack[-1][0] <= start:
                top_end, top = stack.pop()
                emit(cursor, top_end, top)
                cursor = max(cursor, top_end)
            if stack:
                emit(cursor, start, stack[-1][1])
            cursor = start
            stack.append((min(end, stack[-1][0]) if stack else end, name))  # a child never outlives its parent
        while stack:
            top_end, top = stack.pop()
            emit(cursor, top_end, top)
            cursor = max(cursor, top_end)
        out[tid] = (starts, ends)
    return out


def _host_activity(segments: tuple[list[float], list[tuple[float, str]]], a: float, b: float,
                   into: dict[str, float]) -> None:
    """Adds to ``into`` the seconds of [a, b] each innermost host event covered ("idle or untraced" for none)."""
    starts, ends = segments
    covered = 0.0
    for i in range(max(bisect.bisect_right(starts, a) - 1, 0), len(starts)):
        if starts[i] >= b:
            break
        overlap = min(ends[i][0], b) - max(starts[i], a)
        if overlap > 0:
            into[ends[i][1]] = into.get(ends[i][1], 0.0) + overlap
            covered += overlap
    if b - a - covered > 1e-12:
        into["idle or untraced"] = into.get("idle or untraced", 0.0) + (b - a - covered)


def idle_gaps(compute: list[Kernel]) -> Iterator[tuple[Kernel, float, str]]:
    """Each compute kernel (by start) that the device idled before: (the kernel, when the idle gap began, the
    name of the kernel whose end began it)."""
    end, before = (compute[0].end, compute[0].name) if compute else (0.0, "")
    for k in compute[1:]:
        if k.start > end:
            yield k, end, before
        if k.end > end:
            end, before = k.end, k.name


def launched_late(k: Kernel, idle_from: float) -> float | None:
    """How much of the idle gap before ``k`` passed before the host's launch call for it returned (None without
    launch records); the rest of the gap the kernel was launched and waiting (queued)."""
    if k.launch_end is None:
        return None
    return min(max(k.launch_end - idle_from, 0.0), k.start - idle_from)


def device_timeline(trace_events: list[dict[str, Any]], *, steps: int, gap_s: float = 1e-3) -> dict[str, Any]:
    """Is the device starved? From a chrome trace's kernel events (``cat == "kernel"``, ``ts``/``dur`` in
    µs) of one device: the time any compute kernel runs, communication not hidden under compute, idle
    gaps longer than ``gap_s`` on the compute side (the host or a wait holding the device up) with the
    kernels on either side of the longest ones, the compute side's idle time by the trainer phase that
    launched the kernel ending each gap (the kernel the device waited for), and kernel time per category
    and per kernel. Everything per step, between the first and the last kernel of the profiled span.

    Each idle gap between compute kernels also gets a cause (the idle time at the span's edges, outside
    every gap, gets none). ``launched_late``: until the host's launch call for the kernel ending the gap
    returned, and ``launched_late_host_activity_s`` says what that host thread ran meanwhile (the innermost op
    or runtime call; a phase name means Python between ops). ``queued``: the rest, the kernel launched and
    waiting: on another stream (an all-gather, a copy), a copy on its own stream, or the device's own launch
    latency."""
    device = _device(trace_events)
    if device is None:
        return {}
    comm, compute = [], []
    by_category: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    kernels, phases_marked = _kernel_phases(trace_events, device)
    for k in kernels:
        cat = category(k.name)
        (comm if cat == "communication" else compute).append(k)
        by_category[cat] = by_category.get(cat, 0.0) + (k.end - k.start) / steps
        by_kernel[k.name[:80]] = by_kernel.get(k.name[:80], 0.0) + (k.end - k.start) / steps
    compute_u, comm_u = _union([(k.start, k.end) for k in compute]), _union([(k.start, k.end) for k in comm])
    every = compute_u + comm_u
    span_s = max(e for _, e in every) - min(s for s, _ in every)
    busy, comm_s = _length(compute_u), _length(comm_u)
    host = _innermost_segments(trace_events) if any(k.launch_end is not None for k in compute) else {}
    # gaps between consecutive compute kernels (by start): the long ones named by the kernels around them,
    # every one counted for the phase that launched the kernel ending it, and split by cause
    gaps: dict[str, float] = {}
    idle_by_phase: dict[str, float] = {}
    by_cause: dict[str, dict[str, float]] = {}
    activity: dict[str, float] = {}
    for k, end, before in idle_gaps(compute):
        key = k.phase or "outside_phases"
        idle_by_phase[key] = idle_by_phase.get(key, 0.0) + (k.start - end)
        late = launched_late(k, end)
        if late is not None:
            causes = by_cause.setdefault(key, {"launched_late": 0.0, "queued": 0.0})
            causes["launched_late"] += late
            causes["queued"] += k.start - end - late
            if late > 0 and k.thread in host:
                _host_activity(host[k.thread], end, end + late, activity)
        if k.start - end > gap_s:
            key = f"{before[:50]} -> {k.name[:50]}"
            gaps[key] = gaps.get(key, 0.0) + (k.start - end) / steps
    # idle time before the first compute kernel or after the last, while communication ran, waited for no
    # phase's kernel
    edges = span_s - busy - sum(idle_by_phase.values())
    if edges > 1e-9:
        idle_by_phase["outside_phases"] = idle_by_phase.get("outside_phases", 0.0) + edges
    if not phases_marked:  # nothing to attribute to
        idle_by_phase = {}
    out = {
        "span_s": span_s / steps,
        "compute_busy_s": busy / steps,
        "compute_idle_s_by_phase": {k: v / steps for k, v in sorted(idle_by_phase.items())},
        "compute_busy_share": busy / span_s if span_s else 0.0,
        "communication_s": comm_s / steps,
        "communication_exposed_s": (comm_s - _overlap(compute_u, comm_u)) / steps,
        f"compute_gaps_over_{gap_s * 1e3:g}ms_s": sum(gaps.values()),
        "largest_gaps_s": dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:8]),
        "kernel_s_by_category": dict(sorted(by_category.items())),
        "top_kernels_s": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]),
    }
    if by_cause:
        out["compute_idle_s_by_cause"] = {phase: {c: v / steps for c, v in causes.items()}
                                          for phase, causes in sorted(by_cause.items())}
        short: dict[str, float] = {}
        for name, v in activity.items():
            short[name[:80]] = short.get(name[:80], 0.0) + v / steps
        out["launched_late_host_activity_s"] = dict(sorted(short.items(), key=lambda kv: -kv[1])[:12])
    return out


def phase_times(trace_events: list[dict[str, Any]], *, steps: int) -> dict[str, dict[str, float]]:
    """The trainer's record_function phases (data, forward, backward, optimizer_step) per step: on the host
    (``user_annotation``) and, on a device, the span of the kernels and copies each run of the phase launched."""
    out: dict[str, dict[str, float]] = {}
    for phase, spans in _phase_spans(trace_events, "user_annotation").items():
        out[phase] = {"host_s": _length(spans) / steps}
    device = _device(trace_events)
    if device is not None:
        runs: dict[tuple[str, float], tuple[float, float]] = {}
        for k in _kernel_phases(trace_events, device, ("kernel", "gpu_memcpy", "gpu_memset"))[0]:
            if k.phase is not None and k.window is not None:
                first, last = runs.get((k.phase, k.window), (k.start, k.end))
                runs[(k.phase, k.window)] = (min(first, k.start), max(last, k.end))
        for phase in {p for p, _ in runs}:
            spans = _union([span for (p, _), span in runs.items() if p == phase])
            out.setdefault(phase, {})["device_s"] = _length(spans) / steps
    return dict(sorted(out.items()))


def category(name: str) -> str:
    low = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return cat
    return "other"


class StepProfiler:
    def __init__(self, span: tuple[int, int], out_dir: Path, *, rank: int, device_type: str):
        self.first, self.last = span
        self.out_dir, self.rank, self.device_type = out_dir, rank, device_type
        self.prof: Any = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        if step != self.first:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """Call once the step has finished on the device (after the accelerator's synchronize)."""
        if step != self.last or self.prof is None:
            return
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        if self.rank == 0:
            self.write(wall)
        self.prof = None

    def write(self, wall_s: float) -> None:
        from ..atomic import write_json_atomic, write_text_atomic

        self.out_dir.mkdir(parents=True, exist_ok=True)
        averages = self.prof.key_averages()
        device = self.device_type != "cpu"
        # torch >= 2.4 says "device"; older (vendor) builds only "cuda"
        dev_attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") \
            else "self_cuda_time_total"
        sort = dev_attr if device else "self_cpu_time_total"
        write_text_atomic(self.out_dir / "summary.txt", averages.table(sort_by=sort, row_limit=40))
        steps = self.last - self.first + 1
        trace = self.out_dir / "trace.json.gz"
        self.prof.export_chrome_trace(str(trace))
        events = read_trace(trace)
        timeline = device_timeline(events, steps=steps) if device else {}
        if device:  # kernels only: operator rows would count each kernel twice
            per_step = timeline.pop("kernel_s_by_category", {})
        else:
            per_step = {}
            for evt in averages:
                if not evt.key.startswith(PHASE_PREFIX) and evt.self_cpu_time_total > 0:
                    cat = category(evt.key)
                    per_step[cat] = per_step.get(cat, 0.0) + evt.self_cpu_time_total / 1e6 / steps
        write_json_atomic(self.out_dir / "summary.json", {
            "steps": [self.first, self.last], "wall_s": wall_s, "basis": "device" if device else "cpu",
            # kernels on different streams overlap (communication with compute): shares may sum above 1
            "seconds_per_step": dict(sorted(per_step.items())),
            "share_of_wall": {k: v * steps / wall_s for k, v in sorted(per_step.items())},
            "phases_s_per_step": phase_times(events, steps=steps),
            "device_timeline": timeline,
        })
