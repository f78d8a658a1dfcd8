"""result.json: the versioned record of a run, written atomically."""
from __future__ import annotations

import json
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic

SCHEMA = "accelbench.result/1"
RESULT = "result.json"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("accelbench", "torch", "deepspeed", "transformers", "tokenizers", "flash-attn", "pluggy"):
        out[dist] = _version(dist)
    return out


def environment(backend: Any) -> dict[str, Any]:
    info = backend.device_info()
    return {
        "backend": backend.name, "backend_selection": backend.why,
        "backend_plugin": {"name": backend.status.plugin.name, "dist": backend.status.plugin.dist,
                           "version": backend.status.plugin.version},
        "hardware": info.to_dict(),
        "host": {"hostname": socket.gethostname(), "os": platform.platform(), "cpu": backend.machine.cpu_name,
                 "host_memory_bytes": backend.machine.host_memory},
        "software": software_versions(),
    }


def optimizations(plans: dict[str, Any]) -> list[str]:
    """The speed-relevant choices of the plans, one line each (the report's optimisation strategy)."""
    out = {f"attention: {p.attn_implementation}" for p in plans.values()}
    out |= {f"dtype: {p.dtype}" for p in plans.values()}
    out |= {"no padding: packed micro-batches, varlen attention" for p in plans.values() if p.packed}
    out |= {"ranks: each step's samples dealt by length" for p in plans.values() if p.balanced_ranks}
    out |= {"ZeRO-3 step: gradient clip and skip fused into AdamW" for p in plans.values() if p.lean_step}
    out |= {"ZeRO-3: the frozen vision tower whole on every rank" for p in plans.values() if p.whole_tower}
    out |= {f"fused kernels: {p.kernels}" for p in plans.values() if p.kernels != "hf"}
    out |= {f"compiled layers ({stage}): element-wise results recomputed, not saved" for stage, p in plans.items()
            if p.elementwise_recompute}
    out |= {f"activations of up to {p.offload_layers} decoder layers ({stage}) wait in host memory, copied beside "
            f"the compute" for stage, p in plans.items() if p.offload_layers}
    out |= {"loss: logits at target positions only, chunked" if p.loss == "objective"
            else "loss: transformers' (fp32 logits at every position)" for p in plans.values()}
    for stage, p in plans.items():
        if p.grad_ckpt:
            fewest = f"{p.recompute_table[0][1]}-" if len(p.recompute_table) > 1 else ""
            out.add(f"gradient checkpointing ({stage}): {fewest}{p.recompute_layers} of {p.preset.llm.layers} "
                    f"decoder layers replayed" + (", by micro-batch size" if fewest else ""))
    return sorted(out)


def new_result(*, run_dir: Path, backend: Any, case: str, plans: dict[str, Any], random_weights: bool,
               weights: dict[str, Any], data: dict[str, Any], nnodes: int, nproc_per_node: int) -> dict[str, Any]:
    stages = {}
    for stage, plan in plans.items():
        p = plan.to_dict()
        stages[stage] = {
            "plan": p,
            "batch": {"LBS": p["LBS"], "MPE": p["MPE"], "GAS": p["GAS"], "GBS": p["GBS"]},
            "metrics": None,
        }
    notes = []
    if random_weights:
        from ..train.model import RANDOM_WEIGHTS_NOTE

        notes.append(RANDOM_WEIGHTS_NOTE)
    if data.get("synthetic"):
        notes.append("synthetic data in LLaVA's formats (LLaVA-like lengths); not LAION-CC-SBU / mix665k")
    adjustments = [a.to_dict() | {"stage": s} for s, plan in plans.items() for a in plan.adjustments]
    return {
        "schema": SCHEMA, "status": "running", "reason": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir),
        "environment": environment(backend),
        "model": {"case": case, "random_weights": random_weights, "weights": weights},
        "data": data,
        "parallel_strategy": {
            "technique": "sharded data parallel", "implementer": "DeepSpeed ZeRO-DP",
            "details": {s: f"ZeRO-{p.zero_stage}" for s, p in plans.items()},
            "nnodes": nnodes, "nproc_per_node": nproc_per_node, "world_size": nnodes * nproc_per_node,
        },
        "optimizations": optimizations(plans),
        "adjustments": adjustments,
        "stages": stages,
        "mmmu": None,
        "notes": notes,
    }


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULT
    write_json_atomic(path, result)
    return path


def read_result(run_dir: str | Path) -> dict[str, Any]:
    from ..errors import AccelbenchError

    path = Path(run_dir) / RESULT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AccelbenchError(f"{path} does not exist: give a run directory written by `accelbench run`") from None
    except json.JSONDecodeError as exc:
        raise AccelbenchError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("accelbench.result/"):
        raise AccelbenchError(f"{path} is not an accelbench result (no 'schema' of accelbench.result/N)")
    return data
