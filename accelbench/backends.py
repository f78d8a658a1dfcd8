"""Plugin manager: load backend plugins from entry points, isolate broken ones, select a backend.

Each entry point of group ``accelbench.backends`` is loaded on its own; one that fails to import,
or raises in a hook, is reported as broken with its error while the rest keep working.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .capabilities import (Adjustment, AttentionCapability, Availability, BackendSpec, DeviceInfo,
                           KernelCapability, PeakFlops, PrecisionCapability)
from .errors import BackendError
from .machine import MachineFacts, probe_machine

ENTRY_POINT_GROUP = "accelbench.backends"
ENV_BACKEND = "ACCELBENCH_BACKEND"  # select a backend by name
ENV_PLUGINS = "ACCELBENCH_PLUGINS"  # comma-separated entry-point names to load; unset = all, "" = none
BUILTIN = "accelbench.cpu"


@dataclass
class PluginRecord:
    name: str  # entry-point name (or the builtin module name)
    dist: str  # distribution that provides it
    version: str
    module: str
    error: str | None = None  # set when the plugin is broken

    @property
    def broken(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dist": self.dist, "version": self.version, "module": self.module,
                "broken": self.broken, "error": self.error}


@dataclass
class BackendStatus:
    name: str
    priority: int
    plugin: PluginRecord
    available: bool = False
    reason: str = ""
    error: str | None = None  # the backend's plugin raised

    @property
    def broken(self) -> bool:
        return self.error is not None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "priority": self.priority, "plugin": self.plugin.name,
                "dist": self.plugin.dist, "version": self.plugin.version, "available": self.available,
                "reason": self.reason, "broken": self.broken, "error": self.error}

    def line(self) -> str:
        state = "broken" if self.broken else "available" if self.available else "unavailable"
        why = self.error if self.broken else self.reason
        return f"{self.name} ({self.plugin.dist} {self.plugin.version}): {state}: {why}"


def _describe_error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass
class Registry:
    """The plugin manager plus what it found: plugins, backends and their owners."""

    pm: pluggy.PluginManager
    plugins: list[PluginRecord] = field(default_factory=list)
    specs: dict[str, tuple[BackendSpec, PluginRecord]] = field(default_factory=dict)
    _machine: MachineFacts | None = None

    @property
    def machine(self) -> MachineFacts:
        if self._machine is None:
            self._machine = probe_machine()
        return self._machine

    # -- calling hooks with per-plugin isolation -------------------------------------------
    def _record_for(self, plugin: object) -> PluginRecord | None:
        name = self.pm.get_name(plugin)
        return next((p for p in self.plugins if p.name == name), None)

    def _impls(self, hook_name: str) -> list[Any]:
        # pluggy calls the last-registered (and tryfirst) implementations first
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _call_one(self, impl: Any, kwargs: dict[str, Any]) -> tuple[Any, str | None]:
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames]), None
        except Exception as exc:  # a plugin's bug must not take the others down
            error = f"hook {impl.function.__name__} raised {_describe_error(exc)}"
            record = self._record_for(impl.plugin)
            if record is not None and record.error is None:
                record.error = error
            return None, error

    def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """Like a firstresult hook call, but a raising plugin is marked broken and skipped."""
        errors = []
        for impl in self._impls(hook_name):
            result, error = self._call_one(impl, kwargs)
            if error:
                errors.append(error)
            elif result is not None:
                return result
        if errors:
            raise BackendError("; ".join(errors))
        return None

    def call_all(self, hook_name: str, **kwargs: Any) -> list[Any]:
        results = []
        for impl in self._impls(hook_name):
            result, error = self._call_one(impl, kwargs)
            if error:
                raise BackendError(error)
            if result is not None:
                results.append(result)
        return results

    # -- backends --------------------------------------------------------------------------
    def status(self, name: str, machine: MachineFacts | None = None) -> BackendStatus:
        spec, plugin = self.specs[name]
        st = BackendStatus(name, spec.priority, plugin)
        if plugin.broken:
            st.error = plugin.error
            return st
        try:
            availability: Availability | None = self.call_first(
                "accelbench_probe", backend=name, machine=machine or self.machine)
        except BackendError as exc:
            st.error = str(exc)
            return st
        if availability is None:
            st.reason = "no plugin answered the probe"
        else:
            st.available, st.reason = availability.available, availability.reason
        return st

    def statuses(self, machine: MachineFacts | None = None) -> list[BackendStatus]:
        """Every registered backend, in probe order (highest priority first)."""
        names = sorted(self.specs, key=lambda n: -self.specs[n][0].priority)
        return [self.status(n, machine) for n in names]

    def select(self, name: str | None = None, machine: MachineFacts | None = None) -> "Backend":
        """Explicit name, else $ACCELBENCH_BACKEND, else the highest-priority available backend."""
        machine = machine or self.machine
        name = name or os.environ.get(ENV_BACKEND) or None
        if name is not None:
            if name not in self.specs:
                raise BackendError(
                    f"unknown backend {name!r}: registered backends are {', '.join(sorted(self.specs))}"
                    f" (see `accelbench backends`)")
            st = self.status(name, machine)
            if not st.available:
                others = "; ".join(s.line() for s in self.statuses(machine))
                raise BackendError(f"backend {name!r} is not usable here: {st.error or st.reason}. "
                                   f"All backends: {others}")
            return Backend(self, name, machine, st, why=f"chosen by name ({name})")
        statuses = self.statuses(machine)
        for st in statuses:
            if st.available:
                spec = self.specs[st.name][0]
                if spec.accelerator:
                    why = f"highest-priority available backend: {st.reason}"
                else:
                    skipped = "; ".join(f"{s.name}: {s.error or s.reason}" for s in statuses if s is not st)
                    why = f"no accelerator backend is available ({skipped or 'none installed'})"
                return Backend(self, st.name, machine, st, why=why)
        raise BackendError("no backend is available: " + "; ".join(s.line() for s in statuses))


@dataclass
class Backend:
    """A selected backend: the capability queries the planner and trainer use."""

    registry: Registry
    name: str
    machine: MachineFacts
    status: BackendStatus
    why: str = ""

    def _first(self, hook: str, **kw: Any) -> Any:
        result = self.registry.call_first(hook, backend=self.name, **kw)
        if result is None:
            raise BackendError(f"backend {self.name!r} gives no answer to {hook}")
        return result

    def device_info(self) -> DeviceInfo:
        return self._first("accelbench_device_info", machine=self.machine)

    def attention(self) -> AttentionCapability:
        return self._first("accelbench_attention", machine=self.machine)

    def precision(self) -> PrecisionCapability:
        return self._first("accelbench_precision", machine=self.machine)

    def kernels(self) -> KernelCapability:
        """Fused kernel sets (optional: a backend without them trains with transformers' modules)."""
        return self.registry.call_first("accelbench_kernels", backend=self.name, machine=self.machine) \
            or KernelCapability()

    def peak_flops(self, device_name: str, dtype: str) -> PeakFlops:
        result = self.registry.call_first("accelbench_peak_flops", backend=self.name,
                                          device_name=device_name, dtype=dtype)
        return result or PeakFlops(dtype, None, f"no peak table entry for {device_name!r}")

    def host_link(self) -> float | None:
        """The host link's copy rate, bytes/s each way (optional: None, no activations are offloaded)."""
        value = self.registry.call_first("accelbench_host_link", backend=self.name, machine=self.machine)
        return None if value is None else float(value)

    def setup_env(self, env: dict[str, str]) -> list[Adjustment]:
        return [a for lst in self.registry.call_all("accelbench_setup_env", backend=self.name, env=env) for a in lst]

    def adjust_plan(self, plan: Any) -> list[Adjustment]:
        return [a for lst in self.registry.call_all("accelbench_adjust_plan", backend=self.name, plan=plan)
                for a in lst]

    def deepspeed_accelerator(self) -> Any:
        return self.registry.call_first("accelbench_deepspeed_accelerator", backend=self.name)

    def memory_headroom(self) -> float:
        value = self.registry.call_first("accelbench_memory_headroom", backend=self.name)
        return 0.9 if value is None else float(value)

    def memory_calibration(self) -> float:
        value = self.registry.call_first("accelbench_memory_calibration", backend=self.name)
        return 1.0 if value is None else float(value)

    def memory_usage(self) -> list[tuple[int, int]] | None:
        return self.registry.call_first("accelbench_memory_usage", backend=self.name)

    def is_oom(self, error: BaseException) -> bool:
        return bool(self.registry.call_first("accelbench_is_oom", backend=self.name, error=error))

    def capabilities(self) -> dict[str, Any]:
        return {"backend": self.name, "why": self.why, "device": self.device_info().to_dict(),
                "attention": self.attention().to_dict(), "precision": self.precision().to_dict(),
                "kernels": self.kernels().to_dict(), "host_link_bytes_per_s": self.host_link()}


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(ENV_PLUGINS)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


def load_registry(entry_points: bool = True, machine: MachineFacts | None = None,
                  extra_plugins: list[tuple[str, object]] | None = None) -> Registry:
    """Build the plugin manager: the builtin CPU backend, then each allowed entry point."""
    from . import __version__, cpu

    pm = pluggy.PluginManager("accelbench")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm, _machine=machine)
    pm.register(cpu, name=BUILTIN)
    reg.plugins.append(PluginRecord(BUILTIN, "accelbench", __version__, cpu.__name__))

    allowed = _allowed_plugins()
    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allowed is not None and ep.name not in allowed:
                continue
            dist, version = _dist_of(ep)
            record = PluginRecord(ep.name, dist, version, ep.value)
            reg.plugins.append(record)
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # broken plugin: listed, never fatal
                record.error = f"failed to load {ep.value}: {_describe_error(exc)}"
    for name, module in extra_plugins or []:
        pm.register(module, name=name)
        reg.plugins.append(PluginRecord(name, "(in-process)", "", getattr(module, "__name__", name)))

    for record in list(reg.plugins):
        if record.broken:
            continue
        plugin = pm.get_plugin(record.name)
        impl = next((i for i in pm.hook.accelbench_register_backends.get_hookimpls() if i.plugin is plugin), None)
        if impl is None:
            continue
        found: list[BackendSpec] = []
        _, error = reg._call_one(impl, {"register": found.append})
        if error:
            continue
        for spec in found:
            if spec.name in reg.specs:
                record.error = (f"registers backend {spec.name!r}, already registered by "
                                f"{reg.specs[spec.name][1].name}")
                continue
            reg.specs[spec.name] = (spec, record)
    # a plugin that broke after registering keeps its backends listed, as broken
    return reg


def select_backend(name: str | None = None) -> Backend:
    """Convenience for library users: load plugins and select a backend."""
    return load_registry().select(name)


