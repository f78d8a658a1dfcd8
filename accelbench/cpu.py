"""The built-in CPU backend: the embedded default, chosen only when no accelerator is available."""
from __future__ import annotations

import platform
from typing import Any

from .capabilities import (AttentionCapability, AttentionImpl, Availability, BackendSpec,
                           DeviceInfo, PeakFlops, PrecisionCapability)
from .hookspecs import hookimpl
from .machine import MachineFacts

NAME = "cpu"
# CPU flags that mean bf16 runs natively rather than emulated (x86 AVX512-BF16/AMX, Arm BF16)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class InjectedOOM(MemoryError):
    """Raised by fault injection to simulate running out of memory on the CPU backend."""


def _native_bf16(machine: MachineFacts) -> bool:
    return bool(machine.cpu_flags & BF16_FLAGS)


@hookimpl
def accelbench_register_backends(register: Any) -> None:
    register(BackendSpec(NAME, priority=0, description="host CPU (gloo, sdpa)", accelerator=False))


@hookimpl
def accelbench_probe(backend: str, machine: MachineFacts) -> Availability | None:
    if backend != NAME:
        return None
    return Availability(True, f"host CPU {machine.cpu_name or platform.machine()} is always usable")


@hookimpl
def accelbench_device_info(backend: str, machine: MachineFacts) -> DeviceInfo | None:
    if backend != NAME:
        return None
    return DeviceInfo(
        vendor="host CPU", device_names=(machine.cpu_name or platform.machine(),), torch_device_type="cpu",
        memory_bytes=(machine.host_memory,), deepspeed_accelerator="cpu", dist_backend="gloo",
        peak_flops=tuple(PeakFlops(d, None, "no datasheet peak for CPUs: training measures this host's "
                                            "matmul rate instead (accelbench_peak_flops)") for d in ("bf16", "fp32")),
        versions={"torch": machine.torch_version or "not installed", "python": platform.python_version()},
    )


@hookimpl
def accelbench_attention(backend: str, machine: MachineFacts) -> AttentionCapability | None:
    if backend != NAME:
        return None
    # sdpa over packed (unpadded) rows, one sample at a time: no pad tokens, same loss (tests/test_packing.py)
    return AttentionCapability((AttentionImpl("sdpa", varlen=True), AttentionImpl("sdpa", varlen=False),
                                AttentionImpl("eager", varlen=False)))


@hookimpl
def accelbench_precision(backend: str, machine: MachineFacts) -> PrecisionCapability | None:
    if backend != NAME:
        return None
    bf16 = _native_bf16(machine)
    return PrecisionCapability(bf16=bf16, fp16=False, tf32=False, default_dtype="bf16" if bf16 else "fp32",
                               tf32_policy="unsupported", reason="tf32 is a GPU matmul mode; CPUs have none")


@hookimpl
def accelbench_peak_flops(backend: str, device_name: str, dtype: str) -> PeakFlops | None:
    if backend != NAME:
        return None
    # CPUs publish no dense peak per dtype; the trainer asks here, and gets this host's measured
    # large-matmul rate on the threads this process uses (stated as measured, not a datasheet figure).
    flops = measured_matmul_flops(dtype)
    if flops is None:
        return PeakFlops(dtype, None, f"{dtype} matmul not measurable on this CPU")
    import torch

    return PeakFlops(dtype, flops, f"measured: best of torch.matmul 1024^3 {dtype} on {torch.get_num_threads()} "
                                   f"thread(s) of this host", basis="per process")


_MEASURED: dict[tuple[str, int], float | None] = {}


def measured_matmul_flops(dtype: str, n: int = 1024, repeats: int = 5) -> float | None:
    import time

    import torch

    key = (dtype, torch.get_num_threads())
    if key not in _MEASURED:
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
        if tdtype is None:
            return None
        a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first product warms up the kernels
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        _MEASURED[key] = 2 * n**3 / best
    return _MEASURED[key]


@hookimpl
def accelbench_deepspeed_accelerator(backend: str) -> Any:
    if backend != NAME:
        return None
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class NoJitCPUAccelerator(CPU_Accelerator):
        """DeepSpeed's CPU accelerator minus the shared-memory comm op it JIT-builds on every
        initialize (~26 s and a g++ dependency); gloo collectives are used instead."""

        def get_op_builder(self, class_name: str) -> Any:
            if class_name == "ShareMemCommBuilder":
                return None
            return super().get_op_builder(class_name)

    return NoJitCPUAccelerator()


@hookimpl
def accelbench_memory_headroom(backend: str) -> float | None:
    return 0.8 if backend == NAME else None


@hookimpl
def accelbench_is_oom(backend: str, error: BaseException) -> bool | None:
    if backend != NAME:
        return None
    return isinstance(error, MemoryError) or "DefaultCPUAllocator: can't allocate" in str(error)
