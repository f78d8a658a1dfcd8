"""Vendor-neutral capability records.

Backends describe themselves with these frozen dataclasses; the planner, trainer and
report read them and never ask which vendor they are on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    """Turn tuples/mappings/dataclasses into JSON-friendly values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class PeakFlops(_ToDict):
    """Peak dense FLOP/s for one dtype on one device, or unknown (value None)."""

    dtype: str
    flops: float | None
    source: str
    basis: str = "per device"  # e.g. "per chip" where a board holds several chips

    @property
    def known(self) -> bool:
        return self.flops is not None


@dataclass(frozen=True)
class DeviceInfo(_ToDict):
    vendor: str
    device_names: tuple[str, ...]
    torch_device_type: str  # "cpu", "cuda", ...
    memory_bytes: tuple[int, ...]  # per device
    deepspeed_accelerator: str  # DeepSpeed accelerator name ("cpu", "cuda")
    dist_backend: str  # torch.distributed backend ("gloo", "nccl")
    chips_per_board: int = 1
    peak_flops: tuple[PeakFlops, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)  # driver, sdk, torch

    @property
    def device_count(self) -> int:
        return len(self.device_names)

    def peak(self, dtype: str) -> PeakFlops:
        for p in self.peak_flops:
            if p.dtype == dtype:
                return p
        return PeakFlops(dtype, None, "no entry for this dtype")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["device_count"] = self.device_count
        return out


@dataclass(frozen=True)
class AttentionImpl(_ToDict):
    """One attention implementation, named as transformers' ``attn_implementation``."""

    name: str
    varlen: bool  # accepts unpadded (packed, cu_seqlens) input
    env: dict[str, str] = field(default_factory=dict)  # variables it needs set
    packages: tuple[str, ...] = ()  # import names it needs


@dataclass(frozen=True)
class AttentionCapability(_ToDict):
    implementations: tuple[AttentionImpl, ...]  # in order of preference

    @property
    def preferred(self) -> AttentionImpl:
        return self.implementations[0]


@dataclass(frozen=True)
class KernelSet(_ToDict):
    """A set of fused training kernels the trainer knows by name, with the import names it needs:
    ``"liger"`` (Liger's Triton RMSNorm, SwiGLU and rotary kernels) or ``"inductor"`` (each decoder layer
    compiled by ``torch.compile``, whose Inductor backend generates the fused kernels)."""

    name: str
    packages: tuple[str, ...] = ()
    description: str = ""
    compiled: bool = False  # made by torch.compile at run time (lever "compiled-layers" turns such sets off)


@dataclass(frozen=True)
class KernelCapability(_ToDict):
    sets: tuple[KernelSet, ...] = ()  # in order of preference; empty: transformers' own modules


@dataclass(frozen=True)
class PrecisionCapability(_ToDict):
    bf16: bool
    fp16: bool
    tf32: bool
    default_dtype: str  # "bf16", "fp16" or "fp32"
    tf32_policy: str  # "on", "off" or "unsupported"; what the trainer must set
    reason: str = ""  # why the policy is what it is (shown as the adjustment's reason)


@dataclass(frozen=True)
class Adjustment(_ToDict):
    """One change a backend (or the trainer) made to a run: what, from, to, why."""

    what: str
    from_: Any
    to: Any
    why: str
    by: str = ""  # backend or component that made it

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "from": _plain(self.from_), "to": _plain(self.to), "why": self.why, "by": self.by}

    def __str__(self) -> str:
        return f"{self.what}: {self.from_} -> {self.to} ({self.why})"


@dataclass(frozen=True)
class Availability(_ToDict):
    available: bool
    reason: str


@dataclass(frozen=True)
class BackendSpec(_ToDict):
    """What a plugin registers: a backend's name and where it sits in auto-selection."""

    name: str
    priority: int  # higher probes first; CPU is lowest
    description: str = ""
    accelerator: bool = True  # False only for the host-CPU fallback
