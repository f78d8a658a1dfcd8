"""Launcher side of a failed attempt: find the cause among the ranks' reports, back off on out of memory,
and prepare the run directory for a resumed launch."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..cases import get_preset
from ..errors import AccelbenchError
from . import checkpoint
from .metrics import truncate_events
from .watchdog import HANG_DIR, read_hang_reports
from .worker import FAILURES

# a rank's own report beats the collateral errors of its peers (a collective whose partner died)
PRIORITY = {"nonfinite": 0, "oom": 1, "interrupted": 2, "error": 3}


def read_failures(run_dir: str | Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((Path(run_dir) / FAILURES).glob("rank*.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda f: (PRIORITY.get(f.get("kind", "error"), 9), f.get("rank", 0)))


def resume_hint(cfg: Any) -> str:
    stage = first_unfinished_stage(cfg)
    if stage is None:
        return f"every stage finished; `accelbench run --resume {cfg.run_dir}` completes the run"
    step = checkpoint.latest_step(Path(cfg.run_dir) / stage)
    if step is None:
        return (f"no {stage} checkpoint yet: `accelbench run --resume {cfg.run_dir}` restarts {stage} from its "
                f"start (--save-every N keeps checkpoints)")
    return f"`accelbench run --resume {cfg.run_dir}` continues from {stage} step {step}"


def diagnose(exc: BaseException, cfg: Any) -> dict[str, Any]:
    """{"kind", "message", ...}: one line for the user, the details for result.json."""
    from .launch import LaunchInterrupted, RankFailed

    run_dir = Path(cfg.run_dir)
    hangs = read_hang_reports(run_dir)
    if hangs:
        first = min(hangs, key=lambda h: (not h.get("detected"), h["rank"]))
        return {"kind": "hang", "stage": first["stage"], "step": first["stuck_step"], "ranks": hangs,
                "message": f"hang: no rank finished {first['stage']} step {first['stuck_step']} within "
                           f"--hang-timeout {first['timeout_s']:g} s; every rank's Python stacks are in "
                           f"{run_dir / HANG_DIR} (stacks-rank*.txt); all ranks stopped; {resume_hint(cfg)}"}
    failures = read_failures(run_dir)
    own = failures[0] if failures and failures[0].get("kind") != "error" else None
    if isinstance(exc, LaunchInterrupted) or (own and own["kind"] == "interrupted"):
        where = f" at {own['stage']} step {own['step']}" if own else ""
        sig = own["signal"] if own else str(exc).removeprefix("launcher got ")
        return {"kind": "interrupted", "message": f"interrupted by {sig}{where}: checkpoint saved; {resume_hint(cfg)}",
                **({"stage": own["stage"], "step": own["step"]} if own else {})}
    if own is not None:
        message = own["error"].split(": ", 1)[-1]
        if own["kind"] == "nonfinite":
            message += f"; {resume_hint(cfg)} once the data or learning rate is fixed"
        return {**{k: v for k, v in own.items() if k != "traceback"}, "message": message}
    if isinstance(exc, RankFailed):
        died = [r for r, code in exc.exitcodes.items() if code < 0]
        # a rank killed from outside leaves no report; its peers' errors are only the consequence
        if not died and failures:
            return {"kind": "error", "rank": failures[0]["rank"], "error": failures[0]["error"],
                    "message": f"rank {failures[0]['rank']} failed: {failures[0]['error']}; {resume_hint(cfg)}"}
        return {"kind": "rank_died" if died else "error", "message": f"{exc}; {resume_hint(cfg)}"}
    return {"kind": "error", "message": str(exc)}


def smaller_micro_batch(mbs: int) -> int:
    """Half the micro-batch, rounded down to a divisor so GAS can keep the global batch exactly."""
    return max(d for d in range(1, mbs // 2 + 1) if mbs % d == 0)


def back_off(cfg: Any, failure: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Halve the micro-batch of the stage that ran out of memory and double GAS; returns the adjustments."""
    stage, step, plan = failure["stage"], failure["step"], cfg.plans[failure["stage"]]
    why = f"out of memory at step {step}: {failure.get('error', '')}"
    layers = get_preset(cfg.case).llm.layers
    if plan.get("gradient_checkpointing") and plan.get("recompute") == "auto" \
            and (plan.get("recompute_layers", layers) < layers or plan.get("recompute_table")):
        # the planner kept layers from replaying to fill the memory: give that back first
        adjustment = {"what": "recompute_layers", "from": plan["recompute_layers"], "to": layers, "why": why,
                      "by": "trainer", "stage": stage}
        plan["recompute_layers"], plan["recompute"], plan["recompute_table"] = layers, "all", []
        _record(plan, result, stage, [adjustment])
        return [adjustment]
    mbs, gas = int(plan["LBS"]), int(plan["GAS"])
    if mbs <= 1:
        raise AccelbenchError(f"out of memory at {stage} step {step} with micro-batch 1: nothing left to back off "
                              f"({failure.get('error', '')}); use more processes, a shorter --seq or --zero-stage 3")
    new = smaller_micro_batch(mbs)
    new_gas = gas * mbs // new
    adjustments = [
        {"what": "micro_batch", "from": mbs, "to": new, "why": why, "by": "trainer", "stage": stage},
        {"what": "grad_accum", "from": gas, "to": new_gas, "why": f"keep the global batch at {plan['GBS']}",
         "by": "trainer", "stage": stage},
    ]
    plan["LBS"], plan["GAS"] = new, new_gas
    _record(plan, result, stage, adjustments)
    if result:
        result["stages"][stage]["batch"].update(LBS=new, GAS=new_gas)
    return adjustments


def _record(plan: dict[str, Any], result: dict[str, Any], stage: str, adjustments: list[dict[str, Any]]) -> None:
    plan["adjustments"] = list(plan.get("adjustments", [])) + [{k: v for k, v in a.items() if k != "stage"}
                                                               for a in adjustments]
    if result:
        result["stages"][stage]["plan"] = dict(plan)
        result.setdefault("adjustments", []).extend(adjustments)


def first_unfinished_stage(cfg: Any) -> str | None:
    return next((s for s in cfg.stages if not (Path(cfg.run_dir) / s / "summary.json").exists()), None)


def prepare_attempt(cfg: Any) -> None:
    """Clear the previous attempt's reports; on resume, cut events.jsonl back to the checkpoint."""
    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir / FAILURES, ignore_errors=True)
    hang = run_dir / HANG_DIR
    if hang.exists():  # keep the stacks of the earlier hang for the record
        hang.rename(run_dir / f"{HANG_DIR}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume:
        return
    stage = first_unfinished_stage(cfg)
    if stage is None:
        return
    done = cfg.stages[:cfg.stages.index(stage)]
    truncate_events(run_dir / "events.jsonl", done, stage, checkpoint.latest_step(run_dir / stage) or 0)
