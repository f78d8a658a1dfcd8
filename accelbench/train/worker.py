"""The rank entry point: apply the backend's environment, start DeepSpeed, run the stages.

Kept import-light at module level: the backend's environment must be set before torch or
flash_attn is imported in this process.
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any


def rank_main(cfg_dict: dict[str, Any]) -> dict[str, Any] | None:
    from .config import RunConfig
    from .watchdog import StopRequest

    stop = StopRequest()  # first: a SIGTERM from here on ends with a checkpoint, not a dead process
    stop.install()
    cfg = RunConfig.from_dict(cfg_dict)
    for stage in cfg.stages:  # the plan's environment first, before any heavy import
        os.environ.update(cfg.plans[stage]["env"])
    if cfg.threads_per_rank:
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)

    from ..worker_env import quiet_framework_logs

    quiet_framework_logs(all_ranks=cfg.log_all_ranks)
    import torch

    from ..backends import load_registry

    if cfg.threads_per_rank:
        torch.set_num_threads(cfg.threads_per_rank)
    backend = load_registry().select(cfg.backend)
    accelerator = backend.deepspeed_accelerator()
    if accelerator is not None:
        from deepspeed.accelerator import set_accelerator

        set_accelerator(accelerator)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend.device_info().dist_backend)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if backend.device_info().torch_device_type == "cuda":
        torch.cuda.set_device(local)
    any_plan = cfg.plans[cfg.stages[0]]
    if torch.cuda.is_available():  # tf32 from the plan, never from vendor checks
        torch.backends.cuda.matmul.allow_tf32 = bool(any_plan["tf32"])
        torch.backends.cudnn.allow_tf32 = bool(any_plan["tf32"])
    torch.manual_seed(cfg.seed)

    from transformers import AutoTokenizer

    from ..atomic import write_json_atomic
    from .metrics import EventLog
    from .stage import StageRunner

    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    run_dir = Path(cfg.run_dir)
    events = EventLog(run_dir / "events.jsonl" if rank == 0 else None,
                      tensorboard_dir=run_dir / "tensorboard" if rank == 0 and cfg.tensorboard else None)
    watchdog = None
    if cfg.hang_timeout:
        from .watchdog import Watchdog

        watchdog = Watchdog(cfg.hang_timeout, run_dir, rank=rank, local_world=cfg.nproc_per_node)
    summaries: dict[str, Any] = {}
    stage = cfg.stages[0]
    try:
        for stage in cfg.stages:
            done = run_dir / stage / "summary.json"
            if cfg.resume and done.exists():  # finished before the interruption
                summaries[stage] = json.loads(done.read_text(encoding="utf-8"))
                continue
            if stop.signum:  # a signal between stages: the finished ones are on disk already
                from .stage import Interrupted

                raise Interrupted(stage, 0, stop.name, f"{run_dir} (finished stages)")
            runner = StageRunner(cfg, stage, backend, rank=rank, world_size=world, local_rank=local)
            summaries[stage] = runner.run(tokenizer, events, stop=stop, watchdog=watchdog)
            if rank == 0:  # each finished stage is on disk before the next starts
                write_json_atomic(done, summaries[stage])
    except BaseException as exc:
        report_failure(run_dir, rank, stage, exc)
        raise
    finally:
        events.close()
        if watchdog is not None:
            watchdog.close()
    return summaries if rank == 0 else None


FAILURES = "failures"


def report_failure(run_dir: Path, rank: int, stage: str, exc: BaseException) -> None:
    """Each rank says why it stopped (``failures/rankN.json``); the launcher picks the cause, since
    the other ranks usually fail only as a consequence (a collective whose peer died)."""
    from ..atomic import write_json_atomic

    report = exc.report() if hasattr(exc, "report") else {}
    entry = {"rank": rank, "stage": stage, "kind": getattr(exc, "kind", "error"),
             "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()} | report
    try:
        write_json_atomic(run_dir / FAILURES / f"rank{rank}.json", entry)
        if rank == 0:
            write_json_atomic(run_dir / "failure.json", entry)
    except OSError:
        pass  # the original error matters more than its report
