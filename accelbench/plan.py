"""A run plan: case + stage + backend capabilities -> resolved settings and the changes made.

The plan starts from the FlagPerf llava1.5 case settings (the scripts' values), then the backend
sets its environment, the planner resolves dtype/tf32/attention from the capabilities, and the
backend's adjust hook applies vendor limits. Every change is an ``Adjustment``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .capabilities import Adjustment
from .cases import ModelPreset, get_preset
from .errors import ConfigError

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class StageDefaults:
    zero_stage: int
    micro_batch: int
    lr: float
    trainable: str  # what the stage trains
    template: str


# FlagPerf llava1.5_13b deepspeed-torch scripts (LLaVA-1.5 recipe): LBS 32/16, GAS 1, tf32 on.
STAGE_DEFAULTS = {
    "pretrain": StageDefaults(2, 32, 1e-3, "projector", "plain"),
    "finetune": StageDefaults(3, 16, 2e-5, "llm+projector", "vicuna_v1"),
}
CASE_DTYPE, CASE_ATTENTION, CASE_TF32, CASE_SEQ = "bf16", "flash_attention_2", True, 2048


@dataclass
class RunPlan:
    case: str
    stage: str
    backend: str
    nproc: int  # data-parallel world size (all processes, all nodes)
    device_name: str
    device_memory: int  # bytes per device (process)
    micro_batch_requested: int | str  # an int, or "auto"
    micro_batch: int
    grad_accum: int
    seq_len: int  # MPE: model_max_length
    zero_stage: int
    lr: float
    dtype: str = CASE_DTYPE
    tf32: bool = CASE_TF32
    attn_implementation: str = CASE_ATTENTION
    grad_ckpt: bool = True
    packed: bool = False  # unpadded micro-batches (varlen attention): from the chosen attention implementation
    env: dict[str, str] = field(default_factory=dict)
    adjustments: list[Adjustment] = field(default_factory=list)
    memory: dict[str, Any] | None = None  # the memory estimate at the chosen micro-batch
    usable_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.case)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.nproc

    def change(self, what: str, to: Any, why: str, by: str) -> list[Adjustment]:
        """Set attribute ``what``; returns the record of the change (empty when nothing changes).

        The caller hands the records back (a hook's return value, or ``record``), so each change is
        listed exactly once.
        """
        before = getattr(self, what)
        if before == to:
            return []
        setattr(self, what, to)
        return [Adjustment(what, before, to, why, by)]

    def record(self, adjustments: list[Adjustment]) -> None:
        self.adjustments.extend(adjustments)

    def set_micro_batch(self, mbs: int, why: str, by: str) -> list[Adjustment]:
        """Change the micro-batch and keep the global batch through GAS where it divides evenly."""
        gbs = self.global_batch
        out = self.change("micro_batch", mbs, why, by)
        if out and gbs % (mbs * self.nproc) == 0:
            out += self.change("grad_accum", gbs // (mbs * self.nproc), f"keep the global batch at {gbs}", by)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case, "stage": self.stage, "backend": self.backend, "nproc": self.nproc,
            "device_name": self.device_name, "device_memory_bytes": self.device_memory,
            "micro_batch_requested": self.micro_batch_requested, "LBS": self.micro_batch,
            "GAS": self.grad_accum, "GBS": self.global_batch, "MPE": self.seq_len,
            "zero_stage": self.zero_stage, "lr": self.lr, "dtype": self.dtype, "tf32": self.tf32,
            "attn_implementation": self.attn_implementation, "gradient_checkpointing": self.grad_ckpt,
            "packed": self.packed,
            "env": dict(self.env), "adjustments": [a.to_dict() for a in self.adjustments],
            "memory_estimate": self.memory, "usable_memory_bytes": self.usable_memory, "notes": list(self.notes),
        }


def check_positive(option: str, value: int, allowed: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} {value!r} is impossible: {allowed}")
    return value


def parse_mbs(text: str | int | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--mbs {text!r} is not a micro-batch: give a positive integer or 'auto'") from None
    return check_positive("--mbs", value, "give a positive integer or 'auto'")


def memory_input(plan: RunPlan, micro_batch: int) -> Any:
    """The memory model's input for this plan at a given micro-batch."""
    from .memory import MemoryPlanInput
    from .train.ds_config import deepspeed_config

    ds = deepspeed_config(zero_stage=plan.zero_stage, micro_batch=micro_batch, grad_accum=plan.grad_accum,
                          world_size=plan.nproc, dtype=plan.dtype, hidden_size=plan.preset.llm.hidden)
    return MemoryPlanInput(preset=plan.preset, stage=plan.stage, zero_stage=plan.zero_stage, dp_size=plan.nproc,
                           micro_batch=micro_batch, seq_len=plan.seq_len, dtype=plan.dtype,
                           grad_ckpt=plan.grad_ckpt, attn_impl=plan.attn_implementation, ds_config=ds,
                           loss_impl="objective", packed=plan.packed)


def fit_micro_batch(plan: RunPlan, usable_bytes: int, calibration: float = 1.0, max_mbs: int = 256) -> tuple[int, Any]:
    """Largest micro-batch whose estimated peak, times the backend's calibration, fits in ``usable_bytes``."""
    from .memory import fit_micro_batch as fit

    return fit(memory_input(plan, 1), int(usable_bytes / calibration), max_mbs=max_mbs)


def estimate(plan: RunPlan, micro_batch: int | None = None) -> Any:
    from .memory import estimate_memory

    return estimate_memory(memory_input(plan, micro_batch or plan.micro_batch))


def build_plan(backend: Any, *, case: str, stage: str, nproc: int = 1, micro_batch: int | str | None = None,
               grad_accum: int = 1, seq_len: int = CASE_SEQ, zero_stage: int | None = None,
               lr: float | None = None, grad_ckpt: bool = True) -> RunPlan:
    """Resolve a plan for ``backend`` (a ``backends.Backend``) on its machine."""
    preset = get_preset(case)
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is unknown: choose pretrain or finetune")
    check_positive("--nproc", nproc, "give the number of processes, 1 or more")
    check_positive("--gas", grad_accum, "give 1 or more gradient-accumulation steps")
    check_positive("--seq", seq_len, f"give 1..{preset.llm.max_position} tokens")
    if seq_len > preset.llm.max_position or seq_len <= preset.vision.image_tokens:
        raise ConfigError(f"--seq {seq_len} is impossible for {case}: it must exceed the "
                          f"{preset.vision.image_tokens} image tokens and be at most {preset.llm.max_position}")
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage {zero_stage!r} is unknown: choose 0, 1, 2 or 3")
    if lr is not None and not (0 < lr < 1):
        raise ConfigError(f"--lr {lr!r} is impossible: give a learning rate between 0 and 1, e.g. 2e-5")
    defaults = STAGE_DEFAULTS[stage]
    requested = parse_mbs(micro_batch) if micro_batch is not None else defaults.micro_batch
    info = backend.device_info()
    plan = RunPlan(
        case=case, stage=stage, backend=backend.name, nproc=nproc, device_name=info.device_names[0],
        device_memory=info.memory_bytes[0], micro_batch_requested=requested,
        micro_batch=requested if isinstance(requested, int) else defaults.micro_batch,
        grad_accum=grad_accum, seq_len=seq_len, zero_stage=defaults.zero_stage if zero_stage is None else zero_stage,
        lr=(dict(preset.stage_lr).get(stage, defaults.lr) if lr is None else lr), grad_ckpt=grad_ckpt,
    )
    plan.record(backend.setup_env(plan.env))
    _resolve_capabilities(plan, backend)
    plan.usable_memory = int(plan.device_memory * backend.memory_headroom())
    calibration = backend.memory_calibration()
    if requested == "auto":
        mbs, est = fit_micro_batch(plan, plan.usable_memory, calibration)
        if mbs < 1:
            raise ConfigError(f"--mbs auto: even micro-batch 1 is estimated at {est.total / 2**30:.1f} GiB, over the "
                              f"{plan.usable_memory / 2**30:.1f} GiB usable on {plan.device_name}: use more "
                              f"processes (ZeRO-3 shards by process count), a shorter --seq, or a larger device")
        plan.record(plan.set_micro_batch(mbs, f"--mbs auto: largest micro-batch whose estimated peak fits in "
                                              f"{plan.usable_memory / 2**30:.1f} GiB usable", "planner"))
    plan.record(backend.adjust_plan(plan))  # vendor limits apply after any fitting
    plan.memory = estimate(plan).to_dict()
    plan.memory["calibration"] = calibration
    plan.memory["calibrated_total"] = plan.memory["total"] * calibration
    return plan


def _resolve_capabilities(plan: RunPlan, backend: Any) -> None:
    """Generic, vendor-blind resolution of dtype, tf32 and attention from the capabilities."""
    prec = backend.precision()
    supported = {"bf16": prec.bf16, "fp16": prec.fp16, "fp32": True}
    if not supported.get(plan.dtype, False):
        plan.record(plan.change("dtype", prec.default_dtype, f"{plan.dtype} is not supported by backend "
                                f"{backend.name}", backend.name))
    if plan.tf32 and prec.tf32_policy != "on":
        why = prec.reason or f"backend {backend.name} tf32 policy is {prec.tf32_policy!r}"
        plan.record(plan.change("tf32", False, why, backend.name))
    att = backend.attention()
    packages = backend.machine.packages
    usable = [i for i in att.implementations if all(p in packages for p in i.packages)]
    if not usable:
        raise ConfigError(f"backend {backend.name} lists no attention implementation whose packages are installed")
    if plan.attn_implementation != usable[0].name:
        missing = [i for i in att.implementations if i not in usable and i.name == plan.attn_implementation]
        why = (f"{plan.attn_implementation} needs {', '.join(missing[0].packages)}, not importable here"
               if missing else f"backend {backend.name} prefers {usable[0].name}")
        plan.record(plan.change("attn_implementation", usable[0].name, why, backend.name))
    plan.packed = usable[0].varlen
    for key, value in usable[0].env.items():
        if plan.env.get(key) != value:
            plan.adjustments.append(Adjustment(f"env {key}", plan.env.get(key), value,
                                               f"required by attention implementation {usable[0].name}", backend.name))
            plan.env[key] = value
