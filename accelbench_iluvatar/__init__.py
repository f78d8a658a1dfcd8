"""accelbench backend plugin for Iluvatar CoreX accelerators (BI-V100, BI-V150, MR-V100).

CoreX's torch presents itself as CUDA (torch.cuda works, compute capability 8.0 like an A100),
so this backend probes before NVIDIA and recognises CoreX by its torch build or device name.
"""
from __future__ import annotations

import re
from typing import Any

from accelbench.capabilities import (Adjustment, AttentionCapability, AttentionImpl, Availability, BackendSpec,
                                     DeviceInfo, PeakFlops, PrecisionCapability)
from accelbench.hookspecs import hookimpl
from accelbench.machine import MachineFacts
from accelbench.monitor import query_smi

NAME = "iluvatar"
__version__ = "0.1.0"

IXDNN_ENV = "ENABLE_FLASH_ATTENTION_WITH_IXDNN"
IXDNN_WHY = ("ixdnn does not support unpadded (varlen) input, which flash-attention training uses; "
             "0 routes flash_attn through the ixattn kernels")
TF32_WHY = "CoreX does not support tf32 (it reports CUDA 10.2, where transformers refuses tf32)"
T = 1e12

# name pattern -> (chips per board, {dtype: peak FLOP/s per board}, source)
BOARDS: list[tuple[str, int, dict[str, float], str]] = [
    (r"BI-?V150|BI-150", 2, {"bf16": 192 * T, "fp16": 192 * T}, "Iluvatar BI-V150 spec: 192 TFLOPS bf16/fp16 per card"),
    (r"BI-?V100", 1, {"bf16": 147 * T, "fp16": 147 * T}, "Iluvatar BI-V100 spec: 147 TFLOPS fp16 per card"),
    (r"MR-?V100", 1, {"bf16": 96 * T, "fp16": 96 * T}, "Iluvatar MR-V100 spec"),
]
# Limits the vendor measured and documented, beyond what the memory model derives.
DOCUMENTED_MBS_LIMITS: dict[tuple[str, str], tuple[int, str]] = {
    ("llava1.5-13b", "BI-V150"): (4, "FlagPerf llava1.5_13b Iluvatar README: micro-batch only supports <= 4 "
                                     "(out of device memory above it)"),
}
# Allocator calibration: FlagPerf's BI-V150 run held 61.14 GiB per 2-chip card (30.57 GiB per chip) at
# LLaVA-1.5-13B finetune, ZeRO-3, 16 processes, LBS 4, seq 2048, running LLaVA's code (transformers' loss),
# where the analytic model of that step gives 22.43 GiB: CoreX holds 30.57 / 22.43 = 1.36x the modelled
# bytes (reserved cache and an older runtime; the model itself matches H200 peaks within a few percent).
CALIBRATION = 30.57 / 22.43
# That run used 95.5 % of the card without running out of memory: plan on 97 % of a chip.
HEADROOM = 0.97


def _board(device_name: str) -> tuple[int, dict[str, float], str] | None:
    for pattern, chips, peaks, source in BOARDS:
        if re.search(pattern, device_name.upper()):
            return chips, peaks, source
    return None


def corex_evidence(machine: MachineFacts) -> list[str]:
    """Positive signs of an Iluvatar machine. Compute capability alone is never one (ivcore20 says 8.0)."""
    signs = []
    if machine.torch_version and "+corex" in machine.torch_version:
        signs.append(f"torch {machine.torch_version}")
    names = sorted({n for n in machine.device_names if "ILUVATAR" in n.upper() or _board(n)})
    if names:
        signs.append(f"device {', '.join(names)}")
    return signs


@hookimpl
def accelbench_register_backends(register: Any) -> None:
    register(BackendSpec(NAME, priority=200, description="Iluvatar CoreX (probes before NVIDIA)"))


@hookimpl
def accelbench_probe(backend: str, machine: MachineFacts) -> Availability | None:
    if backend != NAME:
        return None
    signs = corex_evidence(machine)
    extra = [p for p in sorted(machine.paths) if "corex" in p] + [t for t in sorted(machine.tools) if t == "ixsmi"]
    if not signs:
        seen = f"; found {', '.join(extra)} but no CoreX torch or Iluvatar device" if extra else ""
        return Availability(False, f"torch {machine.torch_version or '(not installed)'} is not a CoreX build and "
                                   f"no Iluvatar device is visible{seen}")
    if not machine.cuda_available:
        return Availability(False, f"{', '.join(signs)} but no device is usable (torch.cuda.is_available() is False)")
    return Availability(True, ", ".join(signs + extra))


@hookimpl
def accelbench_device_info(backend: str, machine: MachineFacts) -> DeviceInfo | None:
    if backend != NAME:
        return None
    name = machine.device_names[0] if machine.device_names else "unknown"
    board = _board(name)
    chips = board[0] if board else 1
    peaks = tuple(_peak(name, d) for d in ("bf16", "fp16", "tf32"))
    return DeviceInfo(vendor="Iluvatar CoreX", device_names=machine.device_names, torch_device_type="cuda",
                      memory_bytes=machine.device_memory, deepspeed_accelerator="cuda", dist_backend="nccl",
                      chips_per_board=chips, peak_flops=peaks,
                      versions={"torch": machine.torch_version or "?", "sdk": "CoreX", "cuda": machine.cuda_version or "?"})


def _peak(device_name: str, dtype: str) -> PeakFlops:
    board = _board(device_name)
    if board is None:
        return PeakFlops(dtype, None, f"unknown Iluvatar device {device_name!r}")
    chips, peaks, source = board
    if dtype not in peaks:
        return PeakFlops(dtype, None, f"{source}; no {dtype} figure")
    # one process drives one chip, so the per-process peak is the card's divided by its chips
    return PeakFlops(dtype, peaks[dtype] / chips, f"{source} / {chips} chips", basis="per chip")


@hookimpl
def accelbench_peak_flops(backend: str, device_name: str, dtype: str) -> PeakFlops | None:
    return _peak(device_name, dtype) if backend == NAME else None


@hookimpl
def accelbench_attention(backend: str, machine: MachineFacts) -> AttentionCapability | None:
    if backend != NAME:
        return None
    return AttentionCapability((
        AttentionImpl("flash_attention_2", varlen=True, env={IXDNN_ENV: "0"}, packages=("flash_attn",)),
        AttentionImpl("sdpa", varlen=False),
    ))


@hookimpl
def accelbench_precision(backend: str, machine: MachineFacts) -> PrecisionCapability | None:
    if backend != NAME:
        return None
    return PrecisionCapability(bf16=True, fp16=True, tf32=False, default_dtype="bf16", tf32_policy="off",
                               reason=TF32_WHY)


@hookimpl
def accelbench_setup_env(backend: str, env: dict[str, str]) -> list[Adjustment] | None:
    if backend != NAME:
        return None
    before = env.get(IXDNN_ENV)
    env[IXDNN_ENV] = "0"
    return [] if before == "0" else [Adjustment(f"env {IXDNN_ENV}", before, "0", IXDNN_WHY, NAME)]


@hookimpl
def accelbench_adjust_plan(backend: str, plan: Any) -> list[Adjustment] | None:
    if backend != NAME:
        return None
    from accelbench.plan import fit_micro_batch

    out: list[Adjustment] = []
    usable = int(plan.device_memory * HEADROOM)
    fit, _ = fit_micro_batch(plan, usable, CALIBRATION)
    cap, why = fit, (f"memory model x {CALIBRATION:.2f} CoreX calibration: micro-batch {fit + 1} is estimated above "
                     f"the {usable / 2**30:.1f} GiB usable ({HEADROOM:.0%} of {plan.device_memory / 2**30:.0f} GiB "
                     f"per chip)")
    for (case, board), (limit, source) in DOCUMENTED_MBS_LIMITS.items():
        if case == plan.case and re.search(board, plan.device_name.upper()) and limit < cap:  # only where stricter than the model
            cap, why = limit, source
    if cap >= 1 and plan.micro_batch > cap:
        out += plan.set_micro_batch(cap, why, NAME)
    return out


@hookimpl
def accelbench_memory_headroom(backend: str) -> float | None:
    return HEADROOM if backend == NAME else None


@hookimpl
def accelbench_memory_calibration(backend: str) -> float | None:
    return CALIBRATION if backend == NAME else None


@hookimpl
def accelbench_memory_usage(backend: str) -> list[tuple[int, int]] | None:
    return query_smi("ixsmi") if backend == NAME else None


@hookimpl
def accelbench_is_oom(backend: str, error: BaseException) -> bool | None:
    if backend != NAME:
        return None
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
