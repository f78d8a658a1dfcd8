"""accelbench: vendor-neutral accelerator capabilities and a LLaVA-1.5 training benchmark.

Library use::

    import accelbench
    backend = accelbench.select_backend()      # or select_backend("nvidia")
    backend.device_info().to_dict()
"""
from __future__ import annotations

__version__ = "0.1.0"

from .capabilities import (Adjustment, AttentionCapability, AttentionImpl, Availability, BackendSpec,  # noqa: E402
                           DeviceInfo, PeakFlops, PrecisionCapability)
from .errors import AccelbenchError  # noqa: E402


def load_registry(**kwargs):  # type: ignore[no-untyped-def]
    """Load the backend plugins (see ``accelbench.backends.load_registry``)."""
    from .backends import load_registry as _load

    return _load(**kwargs)


def select_backend(name: str | None = None):  # type: ignore[no-untyped-def]
    """Select a backend: by name, by $ACCELBENCH_BACKEND, or the best available one."""
    return load_registry().select(name)


__all__ = ["Adjustment", "AttentionCapability", "AttentionImpl", "Availability", "BackendSpec", "DeviceInfo",
           "PeakFlops", "PrecisionCapability", "AccelbenchError", "load_registry", "select_backend", "__version__"]
