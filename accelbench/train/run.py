"""`accelbench run`: plan both stages, prepare data, launch the ranks, write result.json and report.md."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError, ConfigError
from .launch import LaunchSpec

DEFAULT_STEPS = {"tiny": {"pretrain": 20, "finetune": 20}}
TINY_MBS = {"pretrain": 8, "finetune": 4}  # CPU-sized micro-batches for the embedded default


@dataclass
class RunOptions:
    case: str = "tiny"
    backend: str | None = None
    stages: list[str] = field(default_factory=lambda: ["pretrain", "finetune"])
    steps: int | None = None
    mbs: str | None = None
    gas: int = 1
    seq: int = 2048
    data: str | None = None
    out: str | None = None
    seed: int = 0
    llm: str | None = None
    vision_tower: str | None = None
    projector: str | None = None
    eval_mmmu: bool = True
    mmmu_limit: int | None = None
    mmmu_generation: str = "greedy"
    bad_samples: str = "skip"
    max_bad_fraction: float = 0.01
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    quiet: bool = False


def cache_dir() -> Path:
    base = os.environ.get("ACCELBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "accelbench")
    return Path(base)


def validate(opts: RunOptions) -> None:
    """Refuse impossible options before any heavy import."""
    from ..cases import get_preset
    from ..plan import parse_mbs
    from .model import WeightPaths

    get_preset(opts.case)
    for s in opts.stages:
        if s not in ("pretrain", "finetune"):
            raise ConfigError(f"--stages {s!r} is unknown: choose pretrain, finetune or both")
    if opts.steps is not None and opts.steps < 1:
        raise ConfigError(f"--steps {opts.steps} is impossible: give 1 or more optimizer steps")
    parse_mbs(opts.mbs)
    if not 0 <= opts.max_bad_fraction <= 1:
        raise ConfigError(f"--max-bad-fraction {opts.max_bad_fraction} is impossible: give 0..1")
    opts.launch.check()
    WeightPaths(opts.llm, opts.vision_tower, opts.projector).check()
    if opts.data is not None and not Path(opts.data).is_dir():
        raise ConfigError(f"--data {opts.data!r} is not a folder: give a folder with the LLaVA JSON files, "
                          f"images/ and tokenizer/ (see `accelbench data synth`)")


def prepare_data(opts: RunOptions, image_size: int, vocab: int) -> dict[str, Any]:
    from .synth import synthesize

    if opts.data:
        root = Path(opts.data)
        paths = {"pretrain_json": root / "blip_laion_cc_sbu_558k.json", "finetune_json": root / "llava_v1_5_mix665k.json",
                 "image_folder": root / "images", "tokenizer": root / "tokenizer", "mmmu": root / "mmmu"}
        synthetic = (root / "manifest.json").exists()
    else:
        root = cache_dir() / f"synth-{image_size}px-v{vocab}-s{opts.seed}"
        paths = synthesize(root, image_size=image_size, vocab_size=vocab, seed=opts.seed)
        synthetic = True
    return {k: str(v) for k, v in paths.items() if k != "manifest"} | {"synthetic": synthetic}


def default_run_dir(case: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{case}"


def run(opts: RunOptions) -> dict[str, Any]:
    validate(opts)
    from ..backends import load_registry
    from ..cases import get_preset
    from ..plan import build_plan
    from ..report.markdown import render_markdown
    from ..report.result import new_result, write_result
    from ..atomic import write_text_atomic
    from .config import DataPaths, RunConfig
    from .launch import launch
    from .worker import rank_main

    preset = get_preset(opts.case)
    backend = load_registry().select(opts.backend)
    world = opts.launch.world_size
    plans = {}
    for stage in opts.stages:
        mbs = opts.mbs if opts.mbs is not None else (TINY_MBS[stage] if opts.case == "tiny" else None)
        plans[stage] = build_plan(backend, case=opts.case, stage=stage, nproc=world, micro_batch=mbs,
                                  grad_accum=opts.gas, seq_len=opts.seq)
    data = prepare_data(opts, preset.vision.image_size, preset.llm.vocab if opts.case == "tiny" else 1024)
    run_dir = Path(opts.out) if opts.out else default_run_dir(opts.case)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = opts.steps or DEFAULT_STEPS.get(opts.case, {}).get("pretrain", 20)
    weights = {"llm": opts.llm, "vision_tower": opts.vision_tower, "projector": opts.projector}
    is_rank0_node = opts.launch.node_rank == 0
    do_eval = opts.eval_mmmu and "finetune" in opts.stages and bool(data.get("mmmu")) and Path(data["mmmu"]).is_dir()
    cfg = RunConfig(
        run_dir=str(run_dir.resolve()), case=opts.case, backend=backend.name, stages=list(opts.stages),
        plans={s: p.to_dict() for s, p in plans.items()},
        data=DataPaths(**{k: data[k] for k in ("pretrain_json", "finetune_json", "image_folder", "tokenizer")},
                       mmmu=data.get("mmmu"), synthetic=data["synthetic"]),
        steps={s: steps for s in opts.stages}, seed=opts.seed, weights=weights, eval_mmmu=do_eval,
        mmmu_limit=opts.mmmu_limit, mmmu_generation=opts.mmmu_generation, bad_samples=opts.bad_samples,
        max_bad_fraction=opts.max_bad_fraction, quiet=opts.quiet, nnodes=opts.launch.nnodes, nproc_per_node=opts.launch.nproc_per_node,
        threads_per_rank=max(1, (os.cpu_count() or 1) // opts.launch.nproc_per_node)
        if backend.device_info().torch_device_type == "cpu" else None,
    )
    for stage, plan in plans.items():
        os.environ.update(plan.env)  # every rank inherits the backend's environment
    result = new_result(run_dir=run_dir, backend=backend, case=opts.case, plans=plans,
                        random_weights=not (opts.llm or opts.vision_tower), weights=weights,
                        data={**data, "name": "synthetic LLaVA-format data" if data["synthetic"] else "LLaVA-format JSON"},
                        nnodes=opts.launch.nnodes, nproc_per_node=opts.launch.nproc_per_node)
    if is_rank0_node:
        cfg.save(run_dir / "run_config.json")
        write_result(run_dir, result)
    try:
        returned = launch(opts.launch, rank_main, cfg.to_dict())
    except (AccelbenchError, Exception) as exc:
        if is_rank0_node:
            result["status"], result["reason"] = "failed", str(exc)
            _collect_stage_summaries(run_dir, result)
            write_result(run_dir, result)
            write_text_atomic(run_dir / "report.md", render_markdown(result))
        if isinstance(exc, AccelbenchError):
            raise
        raise AccelbenchError(f"run failed: {exc} (partial results in {run_dir})") from exc
    if not is_rank0_node:
        return {"status": "ok", "run_dir": str(run_dir), "node_rank": opts.launch.node_rank}
    summaries = next((v for v in returned.values() if v), {})
    for stage, summary in summaries.items():
        result["stages"][stage]["metrics"] = summary
    if do_eval:
        result["mmmu"] = run_mmmu_eval(run_dir, cfg, backend, quiet=opts.quiet)
    result["status"] = "ok"
    write_result(run_dir, result)
    write_text_atomic(run_dir / "report.md", render_markdown(result))
    return result


def _collect_stage_summaries(run_dir: Path, result: dict[str, Any]) -> None:
    import json

    for stage in result["stages"]:
        path = run_dir / stage / "summary.json"
        if path.exists():
            result["stages"][stage]["metrics"] = json.loads(path.read_text())


def run_mmmu_eval(run_dir: Path, cfg: Any, backend: Any, *, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the finetuned, consolidated model on the MMMU-format set (rank 0 of node 0)."""
    from ..eval.runner import evaluate_model_dir

    report = evaluate_model_dir(run_dir / "finetune" / "hf_model", cfg.data.mmmu, out_path=run_dir / "mmmu.json",
                                generation=cfg.mmmu_generation, limit=cfg.mmmu_limit, backend=backend, quiet=quiet)
    return mmmu_summary(report, run_dir / "mmmu.json")


def mmmu_summary(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """What result.json keeps of mmmu.json: the accuracy column and how it was obtained."""
    overall = report["overall"]
    return {"accuracy": overall["accuracy"], "correct": overall["correct"], "total": overall["total"],
            "per_discipline": {k: v["accuracy"] for k, v in report["per_discipline"].items()},
            "fallbacks": report["fallbacks"], "generation": report["generation"],
            "image_inputs": report["image_inputs"], "skipped_count": report["skipped_count"], "file": str(path)}
