"""Test helpers for the reporting code: a realistic run directory (result.json, events.jsonl,
mmmu.json) written in milliseconds instead of by training, and the report commands in-process.

The shapes follow a real `accelbench run --steps 8` on the CPU backend; the stage summaries come
from the trainer's own `summarize`, so metrics and events agree the way a real run's do.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from accelbench.train.metrics import StepRecord, summarize, warmup_steps

GIB = 2**30
DISCIPLINES = ["Art and Design", "Business", "Health and Medicine", "Humanities and Social Science", "Science",
               "Tech and Engineering"]


def _adjustments(stage: str, dtype: str) -> list[dict[str, Any]]:
    out = [{"what": "tf32", "from": True, "to": False, "why": "tf32 is a GPU matmul mode; CPUs have none", "by": "cpu"},
           {"what": "attn_implementation", "from": "flash_attention_2", "to": "sdpa",
            "why": "backend cpu prefers sdpa <fast & safe>", "by": "cpu"}]
    if dtype != "bf16":
        out.insert(0, {"what": "dtype", "from": "bf16", "to": dtype, "why": "bf16 is not supported by backend cpu",
                       "by": "cpu"})
    return out


def make_run(root: Path, name: str = "run", *, mbs: int = 4, steps: int = 8, dtype: str = "fp32",
             random_weights: bool = True, device: str = "AMD EPYC", chips_per_board: int = 1,
             basis: str = "per device", peak_tflops: float | None = 1.0, mmmu: bool = True,
             events_warmup_flag: bool = True, seed: int = 0, seq: int = 2048) -> Path:
    """Write a run directory; `events_warmup_flag=False` reproduces events.jsonl files whose warm-up
    flag was never set (the trainer marks warm-up only after the stage)."""
    rng = random.Random(seed)
    run_dir = Path(root) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    total_mem = 24 * GIB
    peak = peak_tflops * 1e12 if peak_tflops else None
    stages: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    all_adj: list[dict[str, Any]] = []
    for stage, zero, lbs in (("pretrain", 2, 2 * mbs), ("finetune", 3, mbs)):
        records = []
        loss = 6.9
        for step in range(1, steps + 1):
            real = rng.randint(35, 45) * lbs
            t = rng.uniform(0.3, 0.6) * (2.0 if step == 1 else 1.0)  # the first step is slow: warm-up
            loss -= rng.uniform(0.0, 0.15)
            records.append(StepRecord(
                stage=stage, step=step, time_s=t, real_tokens=real, padded_tokens=int(real * 1.3), samples=lbs,
                loss=loss, lr=0.01, grad_norm=0.5, model_flops=real * 8e5, hardware_flops=real * 1.4e6,
                mem_allocated=int(0.45 * GIB) + step * 2**20, mem_reserved=int(0.5 * GIB) + step * 2**20,
                rss=int(0.5 * GIB) + step * 2**20, tokens_per_s_per_proc=real / t))
        warm = warmup_steps(len(records))
        for r in records[:warm]:
            r.warmup = events_warmup_flag
        events += [r.to_dict() for r in records]
        metrics = summarize(records, world_size=1, stage_wall_s=sum(r.time_s for r in records) + 2.0,
                            peak_flops=peak, chips_per_board=chips_per_board, flagperf_params=2e7, stage=stage,
                            device_total=total_mem)
        metrics["mem_device_used"] = None
        adj = _adjustments(stage, dtype)
        all_adj += [a | {"stage": stage} for a in adj]
        plan = {"case": "tiny", "stage": stage, "backend": "cpu", "nproc": 1, "device_name": device,
                "device_memory_bytes": total_mem, "micro_batch_requested": lbs, "LBS": lbs, "GAS": 1, "GBS": lbs,
                "MPE": seq, "zero_stage": zero, "lr": 0.01, "dtype": dtype, "tf32": False,
                "attn_implementation": "sdpa", "gradient_checkpointing": True, "env": {}, "adjustments": adj}
        stages[stage] = {"plan": plan, "batch": {"LBS": lbs, "MPE": seq, "GAS": 1, "GBS": lbs}, "metrics": metrics}
    per_disc = {d: {"correct": i % 3, "total": 4, "accuracy": (i % 3) / 4} for i, d in enumerate(DISCIPLINES)}
    correct = sum(v["correct"] for v in per_disc.values())
    mmmu_summary = None
    if mmmu:
        (run_dir / "mmmu.json").write_text(json.dumps({
            "benchmark": "MMMU", "overall": {"correct": correct, "total": 24, "accuracy": correct / 24},
            "per_discipline": per_disc, "per_subject": {}, "fallbacks": 3, "skipped": {}, "skipped_count": 0,
        }), encoding="utf-8")
        mmmu_summary = {"accuracy": correct / 24, "correct": correct, "total": 24,
                        "per_discipline": {k: v["accuracy"] for k, v in per_disc.items()},
                        "file": str(run_dir / "mmmu.json")}
    peaks = [{"dtype": d, "flops": peak, "source": "test table", "basis": basis} for d in ("bf16", "fp32")]
    result = {
        "schema": "accelbench.result/1", "status": "ok", "reason": None, "created": "2026-11-28T08:43:13+0000",
        "run_dir": str(run_dir),
        "environment": {
            "backend": "cpu", "backend_selection": "no accelerator backend is available",
            "backend_plugin": {"name": "accelbench.cpu", "dist": "accelbench", "version": "0.1.0"},
            "hardware": {"vendor": "host CPU", "device_names": [device], "torch_device_type": "cpu",
                         "memory_bytes": [total_mem], "deepspeed_accelerator": "cpu", "dist_backend": "gloo",
                         "chips_per_board": chips_per_board, "peak_flops": peaks,
                         "versions": {"torch": "2.13.0+cpu", "python": "3.11.7"}, "device_count": 1},
            "host": {"hostname": "vm", "os": "Linux-6.18-x86_64", "cpu": device, "host_memory_bytes": total_mem},
            "software": {"python": "3.11.7", "accelbench": "0.1.0", "torch": "2.13.0+cpu", "deepspeed": "0.19.8",
                         "transformers": "5.24.0", "tokenizers": "0.23.3", "flash-attn": "not installed",
                         "pluggy": "1.7.0"},
        },
        "model": {"case": "tiny", "random_weights": random_weights,
                  "weights": {"llm": None, "vision_tower": None, "projector": None}},
        "data": {"synthetic": True, "name": "synthetic LLaVA-format data"},
        "parallel_strategy": {"technique": "sharded data parallel", "implementer": "DeepSpeed ZeRO-DP",
                              "details": {"pretrain": "ZeRO-2", "finetune": "ZeRO-3"},
                              "nnodes": 1, "nproc_per_node": 1, "world_size": 1},
        "optimizations": ["attention: sdpa", f"dtype: {dtype}", "gradient checkpointing"],
        "adjustments": all_adj, "stages": stages, "mmmu": mmmu_summary,
        "notes": ["random weights: throughput and memory only; loss and MMMU not meaningful"] if random_weights else [],
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return run_dir


def report_cli(argv: list[str]) -> int:
    """The report commands through their own argparse registration, in-process (fast; no torch import)."""
    from accelbench import cli_report

    parser = argparse.ArgumentParser(prog="accelbench")
    cli_report.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
