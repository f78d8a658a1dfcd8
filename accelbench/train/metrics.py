"""Per-step measurements and the stage summary (steady-state throughput, MFU, memory, loss).

Accounting (also in docs/metrics.md):
- real tokens: non-pad tokens entering the model, image tokens included; padded tokens: batch x padded length.
- tokens/s per process = real tokens of the steady steps / their summed step time / processes.
- warm-up steps are excluded from the steady numbers; end-to-end divides all tokens by the stage's wall time
  (model build and engine start included, as FlagPerf does).
- MFU = model FLOPs (analytic, real lengths, no recompute) per second per device / peak dense FLOP/s.
  HFU uses hardware FLOPs (recompute and padding included). "MFU (FlagPerf formula)" = k*N*tokens/s/peak.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any, IO


@dataclass
class StepRecord:
    stage: str
    step: int
    time_s: float
    real_tokens: int  # all processes
    padded_tokens: int  # all processes
    samples: int
    loss: float
    lr: float
    grad_norm: float | None
    model_flops: float  # all processes
    hardware_flops: float
    mem_allocated: int  # peak so far on this process (bytes)
    mem_reserved: int
    rss: int
    tokens_per_s_per_proc: float
    warmup: bool = False
    compiled: bool = False  # torch.compile made a graph during this step, on some rank (a one-off cost)
    replayed_layers: int | None = None  # decoder layers replayed in this step's largest micro-batch (checkpointing)
    mem_step_peak: int | None = None  # peak allocated during this step on this process (bytes; GPU only)
    # lever "offload-activations", this process: bytes copied to host memory this step, and saved tensors its
    # backward needed before their copy back had been started (0 when every one was fetched ahead)
    offloaded_bytes: int | None = None
    offload_late: int | None = None
    # what can hold one rank back while the others wait for it at the next collective, the most of any rank this
    # step: seconds its host spent in Python's garbage collector, and its device allocator's retries (an
    # allocation that found no free memory frees every cached block and tries again, after a device sync)
    gc_s: float | None = None
    alloc_retries: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class GcClock:
    """Seconds this process's host spends in Python's garbage collector (``gc.callbacks``), taken step by step."""

    def __init__(self) -> None:
        self._seconds, self._since = 0.0, None
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        elif self._since is not None:
            self._seconds += time.perf_counter() - self._since
            self._since = None

    def take(self) -> float:
        """The seconds since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def close(self) -> None:
        gc.callbacks.remove(self._note)

    def __enter__(self) -> GcClock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def reserved_by_stream(segments: list[dict[str, Any]], names: dict[int, str]) -> dict[str, dict[str, float]]:
    """GiB the device's caching allocator holds, and of it GiB allocated, per stream, from the segments of
    ``torch.cuda.memory_snapshot()``. Its pools are per stream: memory that one stream's tensors freed serves only
    that stream's later allocations until it is released, so another stream running out makes the allocator
    release everything and retry (``StepRecord.alloc_retries``). ``names``: labels of the known streams by handle."""
    out: dict[str, dict[str, float]] = {}
    for segment in segments:
        stream = int(segment["stream"])
        entry = out.setdefault(names.get(stream, f"stream {stream:#x}"), {"reserved_gib": 0.0, "allocated_gib": 0.0})
        entry["reserved_gib"] += segment["total_size"] / 2**30
        entry["allocated_gib"] += segment["allocated_size"] / 2**30
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["reserved_gib"]))


def warmup_steps(total: int) -> int:
    """Steps excluded from steady state: the first fifth, at least 1 and at most 5 (when there are 3+)."""
    return 0 if total < 3 else max(1, min(5, total // 5))


TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s_per_proc", "time_s")


class EventLog:
    """events.jsonl: one line per step, flushed at once so a failed run keeps every step measured.

    With ``tensorboard_dir`` the same steps also go to TensorBoard event files (``--tensorboard``).
    """

    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None):
        self._fh: IO[str] | None = open(path, "a", encoding="utf-8") if path else None
        self._tb = summary_writer(tensorboard_dir) if tensorboard_dir else None

    def write(self, event: dict[str, Any]) -> None:
        if self._fh:
            self._fh.write(json.dumps(event, default=str) + "\n")
            self._fh.flush()
        if self._tb is not None:
            for key in TENSORBOARD_SCALARS:
                if event.get(key) is not None:
                    self._tb.add_scalar(f"{event['stage']}/{key}", event[key], event["step"])
            self._tb.add_scalar(f"{event['stage']}/mem_allocated_gib", event["mem_allocated"] / 2**30, event["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def summary_writer(log_dir: Path) -> Any:
    """torch's SummaryWriter where the tensorboard package is installed, else tensorboardX's."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


def summarize(records: list[StepRecord], *, world_size: int, stage_wall_s: float, peak_flops: float | None,
              chips_per_board: int, flagperf_params: float, stage: str, device_total: int,
              last_n: int = 10) -> dict[str, Any]:
    from .flops import flagperf_mfu

    if not records:
        return {"steps": 0}
    warm = warmup_steps(len(records))
    # a step in which torch.compile made a graph (a new shape) pays a one-off cost: not steady, like warm-up,
    # unless every step after warm-up compiled (then they are all that there is to measure)
    after_warmup = records[warm:]
    steady = [r for r in after_warmup if not r.compiled]
    compile_excluded = len(after_warmup) - len(steady)
    if not steady:
        steady, compile_excluded = after_warmup or records, 0
    t = sum(r.time_s for r in steady)
    tps = sum(r.real_tokens for r in steady) / t / world_size
    model_fps = sum(r.model_flops for r in steady) / t / world_size
    hw_fps = sum(r.hardware_flops for r in steady) / t / world_size
    e2e = sum(r.real_tokens for r in records) / stage_wall_s / world_size
    losses = [r.loss for r in records]
    peak_alloc = max(r.mem_allocated for r in records)
    replays = [r.replayed_layers for r in steady if r.replayed_layers is not None]
    out: dict[str, Any] = {
        "steps": len(records), "warmup_steps_excluded": warm, "compile_steps_excluded": compile_excluded,
        "steady_steps": len(steady),
        "step_time_s_median": sorted(r.time_s for r in steady)[len(steady) // 2],
        "tokens_per_s_per_proc": tps, "tokens_per_s_per_proc_e2e": e2e,
        "tokens_per_s_per_board": tps * chips_per_board if chips_per_board > 1 else None,
        "samples_per_s": sum(r.samples for r in steady) / t,
        "padding_efficiency": sum(r.real_tokens for r in records) / max(1, sum(r.padded_tokens for r in records)),
        "model_flops_per_s_per_proc": model_fps, "hardware_flops_per_s_per_proc": hw_fps,
        "peak_flops_per_proc": peak_flops,
        "mfu": model_fps / peak_flops if peak_flops else None,
        "hfu": hw_fps / peak_flops if peak_flops else None,
        "mfu_flagperf": flagperf_mfu(flagperf_params, stage, tps, peak_flops) if peak_flops else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_mean_last_n": mean(losses[-last_n:]), "loss_last_n": min(last_n, len(losses)),
        "grad_norm_last": records[-1].grad_norm,
        # decoder layers replayed per step (lever "batch-recompute" varies it with the micro-batch's size)
        "replayed_layers_mean": mean(replays) if replays else None,
        "mem_peak_allocated": peak_alloc, "mem_peak_reserved": max(r.mem_reserved for r in records),
        "mem_rss_peak": max(r.rss for r in records), "mem_device_total": device_total,
        # what held ranks back (StepRecord): the longest garbage collection of a step, and allocator retries
        # steady steps: a compiling step's gc_s also holds the full collection after it (train/collector.py)
        "gc_s_max": max((r.gc_s for r in steady if r.gc_s is not None), default=None),
        "alloc_retries": sum(r.alloc_retries for r in records) if any(r.alloc_retries is not None for r in records)
        else None,
        "stage_wall_s": stage_wall_s,
    }
    return out


def read_events(path: Path) -> list[dict[str, Any]]:
    """events.jsonl's step records; a line torn by a kill mid-write is skipped."""
    out: list[dict[str, Any]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "stage" in event and "step" in event:
            out.append(event)
    return out


def read_step_records(path: Path, stage: str, *, upto: int) -> list[StepRecord]:
    """The steps of ``stage`` up to ``upto`` already measured (a resumed stage's summary covers them too)."""
    names = set(StepRecord.__dataclass_fields__)
    return [StepRecord(**{k: v for k, v in e.items() if k in names})
            for e in read_events(path) if e["stage"] == stage and e["step"] <= upto]


def truncate_events(path: Path, keep_stages: list[str], stage: str, upto: int) -> None:
    """Before a resume: keep finished stages and ``stage``'s steps up to its checkpoint, so the resumed
    run appends the rest and events.jsonl still has one line per step."""
    from ..atomic import write_text_atomic

    path = Path(path)
    if not path.exists():
        return
    kept = [e for e in read_events(path) if e["stage"] in keep_stages or (e["stage"] == stage and e["step"] <= upto)]
    write_text_atomic(path, "".join(json.dumps(e, default=str) + "\n" for e in kept))
