"""The pluggy hook specifications of accelbench, and nothing else.

Backend-specific hooks take ``backend`` (a registered name) and return None when the
backend is not theirs, so a plugin answers only for what it registered; a third-party
plugin may still override an answer with ``tryfirst=True`` (e.g. a corrected peak table).
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("accelbench")
hookimpl = pluggy.HookimplMarker("accelbench")


@hookspec
def accelbench_register_backends(register: Callable[[Any], None]) -> None:
    """Call ``register(BackendSpec(...))`` once per backend this plugin provides."""


@hookspec(firstresult=True)
def accelbench_probe(backend: str, machine: Any) -> Any:
    """Return ``Availability(available, reason)`` for ``backend`` on ``machine`` (MachineFacts)."""


@hookspec(firstresult=True)
def accelbench_device_info(backend: str, machine: Any) -> Any:
    """Return the ``DeviceInfo`` of ``machine`` as ``backend`` sees it."""


@hookspec(firstresult=True)
def accelbench_attention(backend: str, machine: Any) -> Any:
    """Return the ``AttentionCapability`` of ``backend`` on ``machine``."""


@hookspec(firstresult=True)
def accelbench_kernels(backend: str, machine: Any) -> Any:
    """Return the ``KernelCapability`` of ``backend`` on ``machine`` (None: no fused kernels)."""


@hookspec(firstresult=True)
def accelbench_precision(backend: str, machine: Any) -> Any:
    """Return the ``PrecisionCapability`` of ``backend`` on ``machine``."""


@hookspec(firstresult=True)
def accelbench_peak_flops(backend: str, device_name: str, dtype: str) -> Any:
    """Return ``PeakFlops`` for one device and dtype; ``PeakFlops(flops=None)`` means unknown."""


@hookspec
def accelbench_setup_env(backend: str, env: dict[str, str]) -> list[Any] | None:
    """Set variables in ``env`` (a rank's environment, before torch/flash_attn import).

    Return one ``Adjustment`` per change. Every plugin may contribute.
    """


@hookspec
def accelbench_adjust_plan(backend: str, plan: Any) -> list[Any] | None:
    """Change a ``RunPlan`` in place (via its setters) and return the ``Adjustment`` list."""


@hookspec(firstresult=True)
def accelbench_deepspeed_accelerator(backend: str) -> Any:
    """Return a DeepSpeed accelerator object to install with ``set_accelerator``, or None."""


@hookspec(firstresult=True)
def accelbench_memory_headroom(backend: str) -> float | None:
    """Fraction of device memory a run may plan to use (allocator and framework reserve)."""


@hookspec(firstresult=True)
def accelbench_is_oom(backend: str, error: BaseException) -> bool | None:
    """True when ``error`` is this backend's out-of-memory error."""


@hookspec(firstresult=True)
def accelbench_memory_usage(backend: str) -> list[tuple[int, int]] | None:
    """(used, total) bytes per local device, from the vendor's monitor (NVML, ixsmi, ...)."""


@hookspec(firstresult=True)
def accelbench_memory_calibration(backend: str) -> float | None:
    """Multiplier from the analytic memory estimate to what this backend's allocator really holds."""


@hookspec(firstresult=True)
def accelbench_host_link(backend: str, machine: Any) -> float | None:
    """Bytes per second one device copies to and from pinned host memory, each way, beside its compute; None where
    the device has no memory of its own to spare that way (the host CPU). Read by lever "offload-activations"."""
