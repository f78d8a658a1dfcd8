"""Stage checkpoints through DeepSpeed: model, optimizer and scheduler, plus our position in the run.

``client_state`` carries what DeepSpeed does not know: optimizer steps done, the data position
(epoch and samples consumed this epoch on each rank, in samples so a changed micro-batch after an
out-of-memory back-off still finds its place) and the stage's elapsed time. Checkpoints are our own
files, written by this process, so DeepSpeed's ``torch.load`` of them is acceptable; weights a user
hands us never go through here.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError

CKPT_DIR = "checkpoints"
KEEP = 2  # the latest two: a torn save never leaves us without a good one


def root(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / CKPT_DIR


def tag(step: int) -> str:
    return f"step{step}"


def latest_step(stage_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint (DeepSpeed writes ``latest`` after the states)."""
    latest = root(stage_dir) / "latest"
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    m = re.fullmatch(r"step(\d+)", name)
    if not m or not (root(stage_dir) / name).is_dir():
        return None
    return int(m.group(1))


def save(engine: Any, stage_dir: str | Path, step: int, client_state: dict[str, Any], *, rank: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    import deepspeed.comm as dist

    path = root(stage_dir)
    engine.save_checkpoint(str(path), tag=tag(step), client_state=client_state, save_latest=True)
    dist.barrier()
    if rank == 0:
        steps = sorted(int(p.name[4:]) for p in path.glob("step*") if p.name[4:].isdigit())
        for old in steps[:-KEEP]:
            if old != step:
                shutil.rmtree(path / tag(old), ignore_errors=True)
    return str(path / tag(step))


def load(engine: Any, stage_dir: str | Path, step: int) -> dict[str, Any]:
    """Collective: restores model, optimizer and scheduler; returns our client state."""
    load_path, client_state = engine.load_checkpoint(str(root(stage_dir)), tag=tag(step),
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None or client_state is None or "step" not in client_state:
        raise AccelbenchError(f"checkpoint {root(stage_dir) / tag(step)} could not be loaded: "
                              f"start the stage again without --resume, or restore the folder")
    return client_state
