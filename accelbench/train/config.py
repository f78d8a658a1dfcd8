"""What a launcher hands to every rank: a JSON-serialisable description of the whole run."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataPaths:
    pretrain_json: str
    finetune_json: str
    image_folder: str
    tokenizer: str
    mmmu: str | None = None
    synthetic: bool = True


@dataclass
class RunConfig:
    run_dir: str
    case: str
    backend: str
    stages: list[str]
    plans: dict[str, dict[str, Any]]  # stage -> RunPlan.to_dict()
    data: DataPaths
    steps: dict[str, int]  # optimizer steps per stage
    seed: int = 0
    weights: dict[str, str | None] = field(default_factory=dict)  # llm, vision_tower, projector
    eval_mmmu: bool = False
    mmmu_limit: int | None = None
    mmmu_generation: str = "greedy"
    bad_samples: str = "skip"
    max_bad_fraction: float = 0.01
    threads_per_rank: int | None = None
    nnodes: int = 1
    nproc_per_node: int = 1
    quiet: bool = False
    log_all_ranks: bool = False  # progress and framework logs from every rank, not rank 0 only
    tensorboard: bool = False  # TensorBoard event files under RUN_DIR/tensorboard (rank 0)
    loader_workers: int | None = None  # None: 0 on CPU, up to 4 per rank on accelerators
    save_every: int | None = None  # optimizer steps between checkpoints (None: only on SIGTERM/SIGINT)
    hang_timeout: float | None = None  # seconds without a finished step before the watchdog fires
    resume: bool = False  # continue finished stages and checkpoints found in run_dir
    profile_steps: list[int] | None = None  # [first, last] optimizer steps to profile in each stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        d["data"] = DataPaths(**d["data"])
        return cls(**d)

    def save(self, path: Path) -> None:
        from ..atomic import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
