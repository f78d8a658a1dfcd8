"""accelbench backend plugin for NVIDIA GPUs (CUDA builds of torch; not ROCm, not CoreX)."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from accelbench.capabilities import (Adjustment, AttentionCapability, AttentionImpl, Availability, BackendSpec, DeviceInfo,
                                     KernelCapability, KernelSet, PeakFlops, PrecisionCapability)
from accelbench.hookspecs import hookimpl
from accelbench.machine import MachineFacts
from accelbench.monitor import query_smi

from .peak_table import LANE_BYTES, lookup, pcie_generation

NAME = "nvidia"
__version__ = "0.1.0"
DTYPES = ("bf16", "fp16", "tf32", "fp32")
TORCH_VARLEN = "torch.nn.attention.varlen"


def not_nvidia_reason(machine: MachineFacts) -> str | None:
    """Why this machine is not an NVIDIA CUDA machine, or None when it is."""
    if machine.torch_version is None:
        return "torch is not installed"
    if "+corex" in machine.torch_version or any("ILUVATAR" in n.upper() for n in machine.device_names):
        return f"torch {machine.torch_version} is Iluvatar CoreX, which presents itself as CUDA"
    if machine.hip_version:
        return f"torch {machine.torch_version} is a ROCm (HIP {machine.hip_version}) build"
    if not machine.cuda_available:
        build = "a CPU build" if machine.cuda_version is None else f"CUDA {machine.cuda_version} build"
        return f"torch.cuda.is_available() is False (torch {machine.torch_version}, {build}; no GPU or driver)"
    return None


def _min_capability(machine: MachineFacts) -> tuple[int, int]:
    return min(machine.capabilities) if machine.capabilities else (0, 0)


@hookimpl
def accelbench_register_backends(register: Any) -> None:
    register(BackendSpec(NAME, priority=100, description="NVIDIA CUDA GPUs (NCCL)"))


@hookimpl
def accelbench_probe(backend: str, machine: MachineFacts) -> Availability | None:
    if backend != NAME:
        return None
    reason = not_nvidia_reason(machine)
    if reason:
        return Availability(False, reason)
    names = sorted(set(machine.device_names))
    return Availability(True, f"{machine.device_count} x {', '.join(names)} (CUDA {machine.cuda_version})")


def _nvml(query: Any) -> Any:
    """Run ``query(pynvml)`` between nvmlInit and nvmlShutdown; None when NVML is missing or fails."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVML is optional: callers fall back to nvidia-smi
        return None
    try:
        return query(pynvml)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def _driver_version() -> str:
    version = _nvml(lambda nv: str(nv.nvmlSystemGetDriverVersion()))
    if version:
        return version
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):  # a hung or broken tool is "unknown", not a broken plugin
            return "unknown"
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    return "unknown"


def _nccl_version() -> str:
    """The NCCL that torch was built with: what runs the collectives, and what NCCL's tuning variables depend on."""
    import torch

    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError):  # a torch without NCCL (CPU builds)
        return "unknown"


@hookimpl
def accelbench_device_info(backend: str, machine: MachineFacts) -> DeviceInfo | None:
    if backend != NAME:
        return None
    name = machine.device_names[0] if machine.device_names else "unknown"
    peaks = tuple(PeakFlops(d, *lookup(name, d)) for d in DTYPES)
    versions = {"torch": machine.torch_version or "?", "cuda": machine.cuda_version or "?"}
    if not machine.described:
        versions["driver"] = _driver_version()
        versions["nccl"] = _nccl_version()
    return DeviceInfo(vendor="NVIDIA", device_names=machine.device_names, torch_device_type="cuda",
                      memory_bytes=machine.device_memory, deepspeed_accelerator="cuda", dist_backend="nccl",
                      peak_flops=peaks, versions=versions)


@hookimpl
def accelbench_attention(backend: str, machine: MachineFacts) -> AttentionCapability | None:
    if backend != NAME:
        return None
    impls = [AttentionImpl("sdpa", varlen=False), AttentionImpl("eager", varlen=False)]
    if _min_capability(machine) >= (8, 0):  # flash kernels need Ampere or newer
        # sdpa taking unpadded input through torch's own flash varlen kernel (no flash_attn needed)
        impls.insert(0, AttentionImpl("sdpa", varlen=True, packages=(TORCH_VARLEN,)))
        impls.insert(0, AttentionImpl("flash_attention_2", varlen=True, packages=("flash_attn",)))
    return AttentionCapability(tuple(impls))


ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_VALUE = "expandable_segments:True"
ALLOC_WHY = ("packed micro-batches change size every step; fixed-size cached segments then fragment (measured: "
             "41 GiB reserved beyond 71 GiB allocated on 7B finetune) until allocation retries stall the step")


@hookimpl
def accelbench_setup_env(backend: str, env: dict[str, str]) -> list[Adjustment] | None:
    if backend != NAME:
        return None
    if ALLOC_ENV in os.environ or ALLOC_ENV in env:  # the user's allocator settings win
        return []
    env[ALLOC_ENV] = ALLOC_VALUE
    return [Adjustment(f"env {ALLOC_ENV}", None, ALLOC_VALUE, ALLOC_WHY, NAME)]


@hookimpl
def accelbench_kernels(backend: str, machine: MachineFacts) -> KernelCapability | None:
    if backend != NAME:
        return None
    if _min_capability(machine) < (8, 0):  # Liger's and Inductor's Triton kernels are tested on Ampere and newer
        return KernelCapability()
    return KernelCapability((
        KernelSet("inductor", packages=("triton",), compiled=True,
                  description="each decoder layer compiled by torch.compile (Inductor's fused Triton kernels), "
                              "run as one ZeRO-3 fetch unit (so is each vision encoder layer): fewer kernel launches "
                              "and host calls per layer"),
        KernelSet("liger", packages=("liger_kernel", "triton"),
                  description="Liger's fused Triton RMSNorm, SwiGLU and rotary kernels: "
                              "fewer kernel launches and smaller saved activations"),
    ))


@hookimpl
def accelbench_precision(backend: str, machine: MachineFacts) -> PrecisionCapability | None:
    if backend != NAME:
        return None
    ampere = _min_capability(machine) >= (8, 0)
    return PrecisionCapability(bf16=ampere, fp16=True, tf32=ampere, default_dtype="bf16" if ampere else "fp16",
                               tf32_policy="on" if ampere else "unsupported")


@hookimpl
def accelbench_peak_flops(backend: str, device_name: str, dtype: str) -> PeakFlops | None:
    if backend != NAME:
        return None
    return PeakFlops(dtype, *lookup(device_name, dtype))


@hookimpl
def accelbench_memory_headroom(backend: str) -> float | None:
    return 0.92 if backend == NAME else None


@hookimpl
def accelbench_memory_usage(backend: str) -> list[tuple[int, int]] | None:
    if backend != NAME:
        return None
    def read(nv: Any) -> list[tuple[int, int]]:
        mems = [nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)) for i in range(nv.nvmlDeviceGetCount())]
        return [(int(m.used), int(m.total)) for m in mems]

    return _nvml(read) or query_smi("nvidia-smi")  # nvidia-smi reads the same counters


@hookimpl
def accelbench_is_oom(backend: str, error: BaseException) -> bool | None:
    if backend != NAME:
        return None
    return type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(error)


# Pinned-memory copies reach this share of the link's rate: on an H200, 0.79 with both directions at once (50 of
# 63 GB/s, benchmarks/gpu/host_link.py in docs/measurements/h200-2026-11-29-g)
COPY_EFFICIENCY = 0.8


def _pcie_link() -> tuple[int, int, int] | None:
    """(generation, lanes, devices sharing the uplink) of device 0's host link as this system runs it, from NVML.

    Devices behind one PCIe switch (NVML's common ancestor a single or several switches, or one board) share its
    uplink to the host: a data-parallel run copies on all of them at once."""
    def read(nv: Any) -> tuple[int, int, int]:
        first = nv.nvmlDeviceGetHandleByIndex(0)
        sharing = 1 + sum(
            nv.nvmlDeviceGetTopologyCommonAncestor(first, nv.nvmlDeviceGetHandleByIndex(i)) <= nv.NVML_TOPOLOGY_MULTIPLE
            for i in range(1, nv.nvmlDeviceGetCount()))
        return int(nv.nvmlDeviceGetMaxPcieLinkGeneration(first)), int(nv.nvmlDeviceGetMaxPcieLinkWidth(first)), sharing

    return _nvml(read)


@hookimpl
def accelbench_host_link(backend: str, machine: MachineFacts) -> float | None:
    if backend != NAME or not machine.device_names:
        return None
    link = None if machine.described else _pcie_link()
    gen, lanes, sharing = link or (pcie_generation(machine.device_names[0]), 16, 1)  # else the product's datasheet
    if gen not in LANE_BYTES:
        return None
    return COPY_EFFICIENCY * LANE_BYTES[gen] * lanes / sharing
