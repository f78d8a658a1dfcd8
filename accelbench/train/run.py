"""`accelbench run`: plan both stages, prepare data, launch the ranks, write result.json and report.md."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccelbenchError, ConfigError
from .launch import LaunchSpec

DEFAULT_STEPS = 20  # optimizer steps per stage
DEFAULT_HANG_TIMEOUT = 1800.0  # seconds; a 13B step on a slow device is minutes, never half an hour
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
    log_all_ranks: bool = False
    tensorboard: bool = False
    zero_stage: int | None = None  # None: the stage's FlagPerf default (2 pretrain, 3 finetune)
    lr: float | None = None
    save_every: int | None = None
    hang_timeout: float | None = None  # None: DEFAULT_HANG_TIMEOUT (a resume keeps its run's); 0: no watchdog
    resume: str | None = None  # a run directory to continue
    recompute: str = "auto"  # decoder layers replayed: auto (memory model), all, or a number
    offload: str = "auto"  # decoder layers whose activations wait in host memory: auto (host link budget) or a number
    without: list[str] = field(default_factory=list)  # levers turned off, for ablations (plan.LEVERS)
    profile: str | None = None  # "A-B": torch.profiler over optimizer steps A..B of each stage
    ds_config: str | None = None  # a DeepSpeed JSON merged over accelbench's config (ZeRO buckets, prefetch)


def cache_dir() -> Path:
    base = os.environ.get("ACCELBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "accelbench")
    return Path(base)


def validate(opts: RunOptions) -> None:
    """Refuse impossible options before any heavy import (no torch, no transformers)."""
    from ..cases import get_preset
    from ..plan import check_levers, check_positive, parse_mbs, parse_offload

    if opts.save_every is not None:
        check_positive("--save-every", opts.save_every, "give a number of optimizer steps, 1 or more")
    if opts.hang_timeout is not None and not opts.hang_timeout >= 0:
        raise ConfigError(f"--hang-timeout {opts.hang_timeout} is impossible: give seconds > 0 (0 turns it off)")
    if opts.resume is not None:
        if not Path(opts.resume, "run_config.json").is_file():
            raise ConfigError(f"--resume {opts.resume!r} is not a run directory (no run_config.json): give the "
                              f"--out folder of an earlier `accelbench run`")
        given = [o for o, v in (("--recompute", opts.recompute != "auto"), ("--offload", opts.offload != "auto"),
                                ("--without", bool(opts.without)),
                                ("--profile", opts.profile is not None), ("--ds-config", opts.ds_config is not None))
                 if v]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot change a run being resumed (its plan comes from "
                              f"run_config.json): drop {'them' if len(given) > 1 else 'it'}, or start a new run")
        opts.launch.check()
        return  # everything else comes from the run being resumed
    preset = get_preset(opts.case)
    for s in opts.stages:
        if s not in ("pretrain", "finetune"):
            raise ConfigError(f"--stages {s!r} is unknown: choose pretrain, finetune or both")
    if opts.steps is not None and opts.steps < 1:
        raise ConfigError(f"--steps {opts.steps} is impossible: give 1 or more optimizer steps")
    parse_mbs(opts.mbs)
    check_levers(opts.recompute, opts.without, preset.llm.layers)
    parse_offload(opts.offload, opts.without, preset.llm.layers)
    from .profiling import parse_profile_steps

    parse_profile_steps(opts.profile, opts.steps or DEFAULT_STEPS)
    check_positive("--gas", opts.gas, "give 1 or more gradient-accumulation steps")
    if not isinstance(opts.seq, int) or not preset.vision.image_tokens < opts.seq <= preset.llm.max_position:
        raise ConfigError(f"--seq {opts.seq} is impossible for {opts.case}: give "
                          f"{preset.vision.image_tokens + 1}..{preset.llm.max_position} tokens (more than the "
                          f"{preset.vision.image_tokens} image tokens)")
    if opts.zero_stage is not None and opts.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage {opts.zero_stage} is unknown: choose 0, 1, 2 or 3")
    if opts.lr is not None and not 0 < opts.lr < 1:
        raise ConfigError(f"--lr {opts.lr} is impossible: give a learning rate between 0 and 1, e.g. 2e-5")
    if not 0 <= opts.max_bad_fraction <= 1:
        raise ConfigError(f"--max-bad-fraction {opts.max_bad_fraction} is impossible: give 0..1")
    opts.launch.check()
    check_weights(opts.case, opts.llm, opts.vision_tower, opts.projector)
    if opts.tensorboard:
        from .metrics import tensorboard_available

        if not tensorboard_available():
            raise ConfigError("--tensorboard needs the tensorboard (or tensorboardX) package: "
                              "pip install 'accelbench[tensorboard]'")
    if opts.data is not None and not Path(opts.data).is_dir():
        raise ConfigError(f"--data {opts.data!r} is not a folder: give a folder with the LLaVA JSON files, "
                          f"images/ and tokenizer/ (see `accelbench data synth`)")


# config.json key -> preset attribute: the shapes a weights folder must share with the preset
LLM_SHAPE_KEYS = {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                  "num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "vocab_size": "vocab"}
VISION_SHAPE_KEYS = {"hidden_size": "hidden", "intermediate_size": "intermediate", "num_hidden_layers": "layers",
                     "num_attention_heads": "heads", "image_size": "image_size", "patch_size": "patch_size"}


def check_weights(case: str, llm: str | None, vision_tower: str | None, projector: str | None) -> None:
    """Missing folders, and folders whose config.json shapes differ from the preset, before any model build."""
    import json

    from ..cases import get_preset

    preset = get_preset(case)
    for option, path, shapes, keys, nested in (("--llm", llm, preset.llm, LLM_SHAPE_KEYS, "text_config"),
                                               ("--vision-tower", vision_tower, preset.vision, VISION_SHAPE_KEYS,
                                                "vision_config")):
        if path is None:
            continue
        config = Path(path, "config.json")
        if not config.is_file():
            raise ConfigError(f"{option} {path!r} is not a Hugging Face model folder (no config.json there)")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{option} {path!r}: config.json cannot be read ({exc})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{option} {path!r}: config.json is not a JSON object")
        cfg = cfg.get(nested) if isinstance(cfg.get(nested), dict) else cfg  # a full LLaVA/CLIP config
        if option == "--llm":
            cfg = {"num_key_value_heads": cfg.get("num_attention_heads"), **cfg}  # Llama's default
        wrong = [f"{key} {cfg[key]} (preset {getattr(shapes, attr)})" for key, attr in keys.items()
                 if key in cfg and cfg[key] != getattr(shapes, attr)]
        if wrong:
            raise ConfigError(f"{option} {path!r} does not match the shapes of --case {case}: {', '.join(wrong)}; "
                              f"choose the --case these weights were made for")
    if projector is not None and not Path(projector).is_file():
        raise ConfigError(f"--projector {projector!r} does not exist: give a projector file (safetensors)")


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
    if opts.resume is not None:
        return resume(opts)
    from .ds_config import load_overrides

    overrides = load_overrides(opts.ds_config) if opts.ds_config else None  # checked before any heavy import
    from ..backends import load_registry
    from ..cases import get_preset
    from ..plan import build_plan
    from ..report.result import new_result, write_result
    from .config import DataPaths, RunConfig
    from .profiling import parse_profile_steps

    preset = get_preset(opts.case)
    backend = load_registry().select(opts.backend)
    world = opts.launch.world_size
    plans = {}
    for stage in opts.stages:
        mbs = opts.mbs if opts.mbs is not None else (TINY_MBS[stage] if opts.case == "tiny" else None)
        plans[stage] = build_plan(backend, case=opts.case, stage=stage, nproc=world, micro_batch=mbs,
                                  grad_accum=opts.gas, seq_len=opts.seq, zero_stage=opts.zero_stage, lr=opts.lr,
                                  recompute=opts.recompute, offload=opts.offload, without=opts.without,
                                  ds_overrides=overrides)
    data = prepare_data(opts, preset.vision.image_size, preset.llm.vocab if opts.case == "tiny" else 1024)
    run_dir = Path(opts.out) if opts.out else default_run_dir(opts.case)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = opts.steps or DEFAULT_STEPS
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
        max_bad_fraction=opts.max_bad_fraction, quiet=opts.quiet, log_all_ranks=opts.log_all_ranks,
        tensorboard=opts.tensorboard, nnodes=opts.launch.nnodes, nproc_per_node=opts.launch.nproc_per_node,
        threads_per_rank=max(1, (os.cpu_count() or 1) // opts.launch.nproc_per_node)
        if backend.device_info().torch_device_type == "cpu" else None,
        save_every=opts.save_every,
        loader_workers=0 if "loader-workers" in opts.without else None,
        profile_steps=list(parse_profile_steps(opts.profile)) if opts.profile else None,
        hang_timeout=(DEFAULT_HANG_TIMEOUT if opts.hang_timeout is None else opts.hang_timeout) or None,
    )
    result = new_result(run_dir=run_dir, backend=backend, case=opts.case, plans=plans,
                        random_weights=not (opts.llm or opts.vision_tower), weights=weights,
                        data={**data, "name": "synthetic LLaVA-format data" if data["synthetic"] else "LLaVA-format JSON"},
                        nnodes=opts.launch.nnodes, nproc_per_node=opts.launch.nproc_per_node)
    if is_rank0_node:
        cfg.save(run_dir / "run_config.json")
        write_result(run_dir, result)
    return execute(cfg, backend, result, opts.launch, plans)


def resume(opts: RunOptions) -> dict[str, Any]:
    """Continue RUN_DIR: finished stages are kept, the interrupted one restarts from its last checkpoint
    with the same plan (back-offs included), data order, schedule and step count."""
    from ..backends import load_registry
    from ..report.result import read_result
    from .config import RunConfig

    run_dir = Path(opts.resume)  # validate() checked run_config.json
    cfg = RunConfig.load(run_dir / "run_config.json")
    cfg.run_dir, cfg.resume, cfg.quiet = str(run_dir.resolve()), True, opts.quiet
    if opts.save_every is not None:
        cfg.save_every = opts.save_every
    if opts.hang_timeout is not None:  # given on the command line
        cfg.hang_timeout = opts.hang_timeout or None
    spec = LaunchSpec(nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes, node_rank=opts.launch.node_rank,
                      master_addr=opts.launch.master_addr, master_port=opts.launch.master_port)
    spec.check()  # the world size must be the checkpoint's
    result: dict[str, Any] = {}
    if spec.node_rank == 0:
        result = read_result(run_dir)
        if result.get("status") == "ok":
            raise ConfigError(f"--resume {str(run_dir)!r}: that run finished (status ok); nothing to resume")
        result["status"], result["reason"] = "running", None
        result.pop("failure", None)
        result.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    backend = load_registry().select(cfg.backend)
    return execute(cfg, backend, result, spec)


def execute(cfg: Any, backend: Any, result: dict[str, Any], spec: LaunchSpec,
            plans: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the data, launch (again after an out-of-memory back-off), evaluate; on any failure leave
    result.json with status "failed" and the reason, events.jsonl as measured, and one clear line.

    ``plans`` (a fresh run's RunPlans) are refined with what the data check learns: the tokens in the
    largest packed micro-batch decide how many decoder layers must be replayed."""
    from ..atomic import write_text_atomic
    from ..report.markdown import render_markdown
    from ..report.result import write_result
    from .datacheck import check_data
    from .launch import LaunchInterrupted, RankFailed
    from .recovery import diagnose

    run_dir = Path(cfg.run_dir)
    is_rank0_node = spec.node_rank == 0
    for plan in cfg.plans.values():
        os.environ.update(plan["env"])  # every rank inherits the backend's environment
    try:
        checked = check_data(cfg)  # before any rank starts: bad data never waits for a model build
        if plans:
            _fit_to_data(cfg, plans, checked, backend, result)
            if is_rank0_node:
                cfg.save(run_dir / "run_config.json")
        if is_rank0_node:
            for stage, info in checked.items():
                result["stages"][stage]["data"] = info
            write_result(run_dir, result)
        returned = _launch_with_backoff(cfg, spec, result)
        if not is_rank0_node:
            return {"status": "ok", "run_dir": str(run_dir), "node_rank": spec.node_rank}
        summaries = next((v for v in returned.values() if v), {})
        for stage, summary in summaries.items():
            result["stages"][stage]["metrics"] = summary
            # changes the trainer made to the model itself (e.g. generation_config.do_sample)
            result["adjustments"] += [a | {"stage": stage} for a in summary.pop("trainer_adjustments", [])]
            result["notes"] += retries_note(stage, summary)
        if cfg.eval_mmmu:  # a resumed evaluation continues from mmmu.partial.jsonl
            result["mmmu"] = run_mmmu_eval(run_dir, cfg, backend, quiet=cfg.quiet)
    except BaseException as exc:
        # our own configuration/data errors are already one clear line; the rest needs the ranks' reports
        plain = isinstance(exc, AccelbenchError) and not isinstance(exc, (RankFailed, LaunchInterrupted))
        failure = {"kind": type(exc).__name__, "message": str(exc)} if plain else diagnose(exc, cfg)
        if is_rank0_node and result:
            result["status"], result["reason"], result["failure"] = "failed", failure["message"], failure
            _collect_stage_summaries(run_dir, result)
            write_result(run_dir, result)
            write_text_atomic(run_dir / "report.md", render_markdown(result))
        if plain:
            raise
        message = failure["message"] or type(exc).__name__
        if failure["kind"] == "error" and not isinstance(exc, RankFailed):
            message = f"run failed: {type(exc).__name__}: {message}"
        raise AccelbenchError(f"{message} (partial results in {run_dir})") from exc
    result["status"] = "ok"
    write_result(run_dir, result)
    write_text_atomic(run_dir / "report.md", render_markdown(result))
    return result


def _fit_to_data(cfg: Any, plans: dict[str, Any], checked: dict[str, Any], backend: Any,
                 result: dict[str, Any]) -> None:
    """Re-plan recompute for packed stages at the data's largest micro-batch (not LBS × MPE)."""
    from ..plan import fit_recompute
    from ..report.result import optimizations

    for stage, plan in plans.items():
        if not plan.packed or stage not in checked:
            continue
        fit_recompute(plan, backend, micro_batch_tokens=checked[stage]["max_micro_batch_tokens"])
        cfg.plans[stage] = plan.to_dict()
        if result:
            result["stages"][stage]["plan"] = plan.to_dict()
    if result:  # nothing else has been added to the adjustments before the launch
        result["adjustments"] = [a.to_dict() | {"stage": s} for s, p in plans.items() for a in p.adjustments]
        result["optimizations"] = optimizations(plans)


def _launch_with_backoff(cfg: Any, spec: LaunchSpec, result: dict[str, Any]) -> dict[int, Any]:
    import json
    import sys

    from ..report.result import write_result
    from .launch import RankFailed, launch
    from .recovery import back_off, diagnose, first_unfinished_stage, prepare_attempt
    from .worker import rank_main

    run_dir = Path(cfg.run_dir)
    while True:
        if cfg.resume and first_unfinished_stage(cfg) is None:  # only the evaluation was left
            return {0: {s: json.loads((run_dir / s / "summary.json").read_text()) for s in cfg.stages}}
        prepare_attempt(cfg)
        try:
            return launch(spec, rank_main, cfg.to_dict())
        except RankFailed as exc:
            failure = diagnose(exc, cfg)
            if failure["kind"] != "oom" or cfg.nnodes > 1:  # other nodes cannot be told to back off
                raise
            adjustments = back_off(cfg, failure, result)
            cfg.resume = True  # restart the stage from its last checkpoint, or from its start
            if spec.node_rank == 0:
                cfg.save(run_dir / "run_config.json")  # a later --resume keeps the smaller micro-batch
                write_result(run_dir, result)
            if not cfg.quiet:
                changes = ", ".join(f"{a['what']} {a['from']} -> {a['to']}" for a in adjustments)
                print(f"accelbench: {failure['message']}; {changes}; restarting {failure['stage']}", file=sys.stderr)


def retries_note(stage: str, summary: dict[str, Any]) -> list[str]:
    """A note for the report when the stage's device allocator had to retry (StepRecord.alloc_retries)."""
    retries = summary.get("alloc_retries")
    if not retries:
        return []
    return [f"{stage}: the device allocator ran out of free memory {retries} time(s) and retried after a device sync "
            "and releasing every cached block, while the other ranks waited; memory is that close to full "
            "(alloc_retries in docs/metrics.md), and --recompute with more layers leaves more room"]


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
