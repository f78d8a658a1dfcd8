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

    cfg = RunConfig.from_dict(cfg_dict)
    for stage in cfg.stages:  # the plan's environment first, before any heavy import
        os.environ.update(cfg.plans[stage]["env"])
    if cfg.threads_per_rank:
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)

    from ..worker_env import quiet_framework_logs

    quiet_framework_logs()
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

    from .metrics import EventLog
    from .stage import StageRunner

    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    run_dir = Path(cfg.run_dir)
    events = EventLog(run_dir / "events.jsonl" if rank == 0 else None)
    summaries: dict[str, Any] = {}
    try:
        for stage in cfg.stages:
            runner = StageRunner(cfg, stage, backend, rank=rank, world_size=world, local_rank=local)
            summaries[stage] = runner.run(tokenizer, events)
            if rank == 0:  # each finished stage is on disk before the next starts
                (run_dir / stage / "summary.json").write_text(json.dumps(summaries[stage], indent=2, default=str))
    except Exception as exc:
        if rank == 0:
            (run_dir / "failure.json").write_text(json.dumps(
                {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, indent=2))
        raise
    finally:
        events.close()
    return summaries if rank == 0 else None

