"""Facts about a machine that backends probe: this one, or one described on the command line.

Probes read only these facts, so detection logic is testable on a CPU laptop with described
machines (torch version strings, device names, environment) as well as on the real hardware.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
from dataclasses import dataclass, field, replace

from .errors import ConfigError

# Packages whose presence changes what a backend can run; checked with find_spec (no import).
KNOWN_PACKAGES = ("flash_attn", "liger_kernel", "triton", "deepspeed", "transformers", "pynvml", "torch.nn.attention.varlen")
EVIDENCE_PATHS = ("/usr/local/corex",)
EVIDENCE_TOOLS = ("ixsmi", "nvidia-smi", "rocm-smi")


@dataclass(frozen=True)
class MachineFacts:
    torch_version: str | None = None  # None: torch not importable
    cuda_available: bool = False
    cuda_version: str | None = None  # torch.version.cuda (CoreX reports 10.2)
    hip_version: str | None = None  # set on ROCm builds
    device_names: tuple[str, ...] = ()
    device_memory: tuple[int, ...] = ()  # bytes per device
    capabilities: tuple[tuple[int, int], ...] = ()  # compute capability per device
    packages: frozenset[str] = frozenset()  # importable packages among KNOWN_PACKAGES
    paths: frozenset[str] = frozenset()  # evidence paths that exist
    tools: frozenset[str] = frozenset()  # evidence tools on PATH
    env: dict[str, str] = field(default_factory=dict)
    cpu_name: str = ""
    cpu_flags: frozenset[str] = frozenset()
    host_memory: int = 0
    described: bool = False  # True when built from a description, not probed

    @property
    def device_count(self) -> int:
        return len(self.device_names)

    def with_packages(self, *names: str) -> "MachineFacts":
        return replace(self, packages=self.packages | frozenset(names))


def _importable() -> frozenset[str]:
    found = set()
    for name in KNOWN_PACKAGES:
        try:
            if importlib.util.find_spec(name) is not None:
                found.add(name)
        except ImportError:  # a submodule whose parent package is missing
            pass
    return frozenset(found)


def _cpu_facts() -> tuple[str, frozenset[str]]:
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def probe_machine() -> MachineFacts:
    """Read this machine. Imports torch (but never deepspeed or transformers)."""
    cpu_name, cpu_flags = _cpu_facts()
    packages = _importable()
    base = dict(
        packages=packages,
        paths=frozenset(p for p in EVIDENCE_PATHS if os.path.exists(p)),
        tools=frozenset(t for t in EVIDENCE_TOOLS if shutil.which(t)),
        env=dict(os.environ), cpu_name=cpu_name, cpu_flags=cpu_flags, host_memory=_host_memory(),
    )
    try:
        import torch
    except ImportError:
        return MachineFacts(**base)
    names: list[str] = []
    memory: list[int] = []
    caps: list[tuple[int, int]] = []
    cuda = False
    try:
        cuda = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if cuda else 0):
            props = torch.cuda.get_device_properties(i)
            names.append(props.name)
            memory.append(int(props.total_memory))
            caps.append((int(props.major), int(props.minor)))
    except RuntimeError:  # a broken driver reads as "no devices", not a crash
        cuda = False
    return MachineFacts(
        torch_version=torch.__version__, cuda_available=cuda,
        cuda_version=getattr(torch.version, "cuda", None), hip_version=getattr(torch.version, "hip", None),
        device_names=tuple(names), device_memory=tuple(memory), capabilities=tuple(caps), **base,
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, option: str = "--device-memory") -> int:
    """'32GiB', '80GB', '80 GB', '1073741824' -> bytes. Refuses zero, negatives and nonsense."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{option} {text!r} is not a size: use a number with a unit, e.g. 32GiB or 80GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 2**30 or value > 2**44:
        raise ConfigError(f"{option} {text!r} is impossible for one device: give 1 GiB to 16 TiB, e.g. 32GiB")
    return value


def describe_machine(device_name: str, device_memory: int, count: int = 1, *, torch_version: str | None = None,
                     capability: tuple[int, int] | None = None, packages: frozenset[str] | None = None,
                     env: dict[str, str] | None = None) -> MachineFacts:
    """A machine described by the user (for `accelbench plan`), not this one.

    Packages default to this host's, so a plan reflects what this environment could import.
    """
    if packages is None:
        packages = _importable()
    cap = capability or _guess_capability(device_name)
    if torch_version is None:  # the described machine runs this environment's torch release
        from importlib import metadata

        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "unknown"
    return MachineFacts(
        torch_version=torch_version, cuda_available=True, device_names=(device_name,) * count,
        device_memory=(device_memory,) * count, capabilities=(cap,) * count, packages=packages,
        env=dict(env or {}), described=True,
    )


def _guess_capability(device_name: str) -> tuple[int, int]:
    """Compute capability from a product name (described machines only)."""
    n = device_name.upper()
    # Iluvatar first: "BI-V100" would otherwise read as an NVIDIA V100 (ivcore reports 8.0)
    for pattern, cap in ((r"ILUVATAR|BI-V1|BI-150|MR-V", (8, 0)), (r"B200|GB200|B100", (10, 0)),
                         (r"H100|H200|H800|GH200", (9, 0)), (r"L40|L4\b|RTX 40|ADA", (8, 9)),
                         (r"A100|A800|A30\b", (8, 0)), (r"A10\b|A40|A6000|RTX 30", (8, 6)), (r"V100", (7, 0)),
                         (r"T4\b", (7, 5))):
        if re.search(pattern, n):
            return cap
    return (0, 0)
