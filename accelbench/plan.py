"""A run plan: case + stage + backend capabilities -> resolved settings and the changes made.

The plan starts from the FlagPerf llava1.5 case settings (the scripts' values), then the backend
sets its environment, the planner resolves dtype/tf32/attention from the capabilities, and the
backend's adjust hook applies vendor limits. Every change is an ``Adjustment``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from typing import Any

from .capabilities import Adjustment
from .cases import ModelPreset, get_preset
from .errors import ConfigError

STAGES = ("pretrain", "finetune")
OVER_MEMORY = "the estimate "  # the start of the plan note that warns of an estimate above the usable memory
# The speed levers a run can be told to go without (`--without`), for ablations.
LEVERS = {
    "packing": "pad micro-batches instead of packing them for varlen attention",
    "selective-recompute": "replay every decoder layer instead of only as many as memory needs",
    "batch-recompute": "replay in every micro-batch as many layers as the data's longest one needs, instead of as "
                       "many as each one needs",
    "target-loss": "transformers' loss (fp32 logits at every position) instead of the target-only chunked loss",
    "fused-kernels": "transformers' own norm/MLP/rotary modules instead of the backend's fused or compiled kernels",
    "compiled-layers": "eager decoder layers (the backend's next kernel set) instead of torch.compile'd ones",
    "loader-workers": "load and collate batches in the training process",
    "balanced-ranks": "give each rank its batch in LLaVA's order instead of dealing every step's samples to the "
                      "ranks by length",
    "zero3-buckets": "LLaVA's ZeRO-3 bucket sizes (hidden², HF's auto) instead of 5e8-element prefetch and reduce buckets",
    "lean-step": "DeepSpeed's own ZeRO-3 optimizer step instead of one with the clip factor and the skip flag fused "
                 "into AdamW",
    "elementwise-recompute": "compiled decoder layers that keep their activations also keep the normed inputs, the "
                             "attention output and the SwiGLU product (Inductor's default) instead of recomputing "
                             "them in the backward",
    "offload-activations": "replay the decoder layers that memory cannot keep instead of keeping some of them in "
                           "host memory, copied there and back beside the compute",
    "whole-tower": "ZeRO-3 partitions the frozen vision tower like every other module (LLaVA's persistence "
                   "threshold, 10·hidden) instead of keeping it whole on every rank",
}


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
COMPILED_KERNELS = "inductor"  # the kernel set the trainer makes with torch.compile (train/kernels.py)
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
    kernels: str = "hf"  # "hf" (transformers' modules) or a fused kernel set the backend offers ("liger")
    loss: str = "objective"  # "objective" (target positions only, chunked) or "hf" (transformers' own)
    recompute: int | str = "auto"  # decoder layers to replay: "auto" (memory model), "all" or a number
    offload: int | str = "auto"  # kept decoder layers offloaded to host memory: "auto" (host link budget) or a number
    recompute_layers: int = 0  # resolved: how many decoder layers are checkpointed (at the longest micro-batch)
    # "auto" (lever "batch-recompute"): [max_tokens, replayed layers] rows, so that each micro-batch replays only
    # what its own size needs (memory.recompute_table); empty: every micro-batch replays recompute_layers
    recompute_table: list[list[int]] = field(default_factory=list)
    # Tokens in the largest micro-batch the memory estimate assumes: LBS × MPE until the data is known
    micro_batch_tokens: int | None = None
    without: tuple[str, ...] = ()  # levers turned off (LEVERS)
    ds_overrides: dict[str, Any] = field(default_factory=dict)  # --ds-config, merged over the DeepSpeed config
    zero3_buckets: bool = False  # resolved: ZeRO-3 runs with ds_config.ZERO3_BUCKETS (lever "zero3-buckets")
    # resolved (lever "elementwise-recompute"): compiled layers that keep their activations keep only what needs a
    # GEMM to recompute, where memory makes some layers replay (fit_recompute)
    elementwise_recompute: bool = False
    # resolved (lever "offload-activations"): kept decoder layers whose saved tensors wait in host memory, as many
    # as the host link moves within the forward, where memory makes some layers replay (fit_recompute)
    offload_layers: int = 0
    offload_layer_bytes: int = 0  # what one offloaded layer saves at the largest micro-batch (its pinned memory)
    # [max_tokens, offloaded layers] rows (memory.offload_table): each micro-batch offloads only what its own size
    # needs, up to offload_layers
    offload_table: list[list[int]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    adjustments: list[Adjustment] = field(default_factory=list)
    memory: dict[str, Any] | None = None  # the memory estimate at the chosen micro-batch
    usable_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.case)

    def deepspeed_overrides(self) -> dict[str, Any]:
        from .memory import tower_threshold
        from .train.ds_config import tuned_overrides

        return tuned_overrides(self.zero3_buckets, self.ds_overrides,
                               compiled_layers=self.zero_stage == 3 and self.kernels == COMPILED_KERNELS,
                               tower_threshold=tower_threshold(self.preset) if self.whole_tower else None)

    @property
    def whole_tower(self) -> bool:
        """Lever "whole-tower": under ZeRO-3 the frozen vision tower stays whole on every rank (DeepSpeed's
        persistence threshold raised to its encoder layers' largest tensor, ``memory.tower_threshold``), so its
        forward gathers nothing. Partitioned, each of its layers waits on an all-gather, which waits for the slowest
        rank, for a few GEMMs 1024 wide."""
        return self.zero_stage == 3 and "whole-tower" not in self.without

    @property
    def balanced_ranks(self) -> bool:
        """Lever "balanced-ranks": each step's samples are dealt to the ranks by length (data.deal_by_length).
        Ranks wait for each other at every ZeRO collective, so a step runs at the pace of the rank with the
        most tokens."""
        return self.nproc > 1 and "balanced-ranks" not in self.without

    @property
    def lean_step(self) -> bool:
        """Lever "lean-step": ZeRO-3's optimizer step with fewer passes over memory and no host sync midway
        (train/zero3_step.py)."""
        return self.zero_stage == 3 and "lean-step" not in self.without

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
            "packed": self.packed, "kernels": self.kernels, "loss": self.loss, "recompute": self.recompute,
            "offload": self.offload,
            "recompute_layers": self.recompute_layers, "recompute_table": [list(r) for r in self.recompute_table],
            "micro_batch_tokens": self.micro_batch_tokens,
            "without": list(self.without), "zero3_buckets": self.zero3_buckets, "balanced_ranks": self.balanced_ranks,
            "lean_step": self.lean_step, "whole_tower": self.whole_tower,
            "elementwise_recompute": self.elementwise_recompute,
            "offload_layers": self.offload_layers, "offload_layer_bytes": self.offload_layer_bytes,
            "offload_table": [list(r) for r in self.offload_table],
            "ds_overrides": self.deepspeed_overrides(),
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


def memory_input(plan: RunPlan, micro_batch: int | None = None) -> Any:
    """The memory model's input: for the plan as resolved (``micro_batch`` None: its micro-batch, the
    data's token bound, its recompute choice), or for another micro-batch while fitting one (every
    sample at MPE, every layer replayed)."""
    from .memory import MemoryPlanInput
    from .train.ds_config import deepspeed_config

    planned = micro_batch is None
    micro_batch = plan.micro_batch if micro_batch is None else micro_batch
    ds = deepspeed_config(zero_stage=plan.zero_stage, micro_batch=micro_batch, grad_accum=plan.grad_accum,
                          world_size=plan.nproc, dtype=plan.dtype, hidden_size=plan.preset.llm.hidden,
                          overrides=plan.deepspeed_overrides())
    return MemoryPlanInput(preset=plan.preset, stage=plan.stage, zero_stage=plan.zero_stage, dp_size=plan.nproc,
                           micro_batch=micro_batch, seq_len=plan.seq_len, dtype=plan.dtype,
                           grad_ckpt=plan.grad_ckpt, attn_impl=plan.attn_implementation, ds_config=ds,
                           loss_impl=plan.loss, packed=plan.packed, kernels=plan.kernels,
                           elementwise_recompute=plan.elementwise_recompute,
                           offload_layers=plan.offload_layers if planned else 0,
                           tokens=plan.micro_batch_tokens if planned else None,
                           recompute_layers=plan.recompute_layers if planned else None)


def fit_micro_batch(plan: RunPlan, usable_bytes: int, calibration: float = 1.0, max_mbs: int = 256) -> tuple[int, Any]:
    """Largest micro-batch whose estimated peak, times the backend's calibration, fits in ``usable_bytes``."""
    from .memory import fit_micro_batch as fit

    return fit(memory_input(plan, 1), int(usable_bytes / calibration), max_mbs=max_mbs)


def estimate(plan: RunPlan, micro_batch: int | None = None) -> Any:
    from .memory import estimate_memory

    return estimate_memory(memory_input(plan, micro_batch))


def build_plan(backend: Any, *, case: str, stage: str, nproc: int = 1, micro_batch: int | str | None = None,
               grad_accum: int = 1, seq_len: int = CASE_SEQ, zero_stage: int | None = None,
               lr: float | None = None, grad_ckpt: bool = True, recompute: int | str = "auto",
               offload: int | str = "auto",
               without: tuple[str, ...] | list[str] = (), ds_overrides: dict[str, Any] | None = None) -> RunPlan:
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
    recompute = check_levers(recompute, without, preset.llm.layers)
    offload = parse_offload(offload, without, preset.llm.layers)
    if offload and offload != "auto" and backend.host_link() is None:
        raise ConfigError(f"--offload {offload}: backend {backend.name!r} has no host link to offload over (its "
                          f"device computes in host memory); drop --offload")
    defaults = STAGE_DEFAULTS[stage]
    requested = parse_mbs(micro_batch) if micro_batch is not None else defaults.micro_batch
    info = backend.device_info()
    plan = RunPlan(
        case=case, stage=stage, backend=backend.name, nproc=nproc, device_name=info.device_names[0],
        device_memory=info.memory_bytes[0], micro_batch_requested=requested,
        micro_batch=requested if isinstance(requested, int) else defaults.micro_batch,
        grad_accum=grad_accum, seq_len=seq_len, zero_stage=defaults.zero_stage if zero_stage is None else zero_stage,
        lr=(dict(preset.stage_lr).get(stage, defaults.lr) if lr is None else lr), grad_ckpt=grad_ckpt,
        recompute="all" if "selective-recompute" in without else recompute, offload=offload,
        recompute_layers=preset.llm.layers if grad_ckpt else 0, without=tuple(without),
        ds_overrides=dict(ds_overrides or {}),
    )
    if "target-loss" in without:
        plan.record(plan.change("loss", "hf", "--without target-loss", "user"))
    plan.record(backend.setup_env(plan.env))
    _resolve_capabilities(plan, backend)
    _check_compiled_layer_config(plan)
    if plan.whole_tower:
        from .memory import tower_threshold
        from .train.ds_config import llava_persistence_threshold

        llava = llava_persistence_threshold(plan.preset.llm.hidden)
        plan.record([Adjustment("stage3_param_persistence_threshold", f"{llava} (10·hidden, LLaVA's zero3.json)",
                                tower_threshold(plan.preset), "the frozen vision tower stays whole on every rank, "
                                "so its forward gathers nothing (--without whole-tower)", "accelbench")])
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
    fit_recompute(plan, backend)
    return plan


def check_levers(recompute: int | str, without: tuple[str, ...] | list[str], layers: int) -> int | str:
    """--recompute and --without, checked together; returns the parsed --recompute."""
    unknown = sorted(set(without) - set(LEVERS))
    if unknown:
        raise ConfigError(f"--without {','.join(unknown)}: unknown lever; choose from {', '.join(LEVERS)}")
    parsed = parse_recompute(recompute, layers)
    if "selective-recompute" in without and parsed != "auto":
        raise ConfigError(f"--recompute {recompute} and --without selective-recompute contradict each other: "
                          f"give one of them")
    return parsed


def _layer_count(option: str, value: int | str, layers: int, words: str) -> int:
    """``value`` as a number of decoder layers, 0..layers; ``words``: the option's other values, for the error."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if not 0 <= n <= layers:
        raise ConfigError(f"{option} {value!r} is impossible: give {words} or a number of decoder layers 0..{layers}")
    return n


def parse_recompute(value: int | str, layers: int) -> int | str:
    if value in ("auto", "all"):
        return value
    return _layer_count("--recompute", value, layers, "auto, all")


def parse_offload(value: int | str, without: tuple[str, ...] | list[str], layers: int) -> int | str:
    """--offload: "auto" or a number of decoder layers; checked against --without offload-activations."""
    if value == "auto":
        return value
    n = _layer_count("--offload", value, layers, "auto")
    if n and "offload-activations" in without:
        raise ConfigError(f"--offload {value} and --without offload-activations contradict each other: give one of "
                          f"them")
    return n


def fit_recompute(plan: RunPlan, backend: Any, micro_batch_tokens: int | None = None) -> None:
    """Resolve how many decoder layers replay their forward, then the plan's memory estimate.

    ``auto``: the fewest whose estimate, at the plan's largest micro-batch, fits the usable memory
    (lever 2: recompute only what memory needs), and the table by which a smaller micro-batch replays fewer
    (lever "batch-recompute").  Without data the micro-batch is assumed full
    (LBS × MPE tokens); ``accelbench run`` calls this again with the data's bound once it is known.
    """
    from .memory import fit_recompute as fit, offload_table, recompute_table

    if micro_batch_tokens is not None:
        plan.micro_batch_tokens = micro_batch_tokens
    layers = plan.preset.llm.layers
    calibration = backend.memory_calibration()
    # a re-fit judges afresh
    plan.notes = [n for n in plan.notes if not n.startswith((OVER_MEMORY, BUCKETS_NOTE, FIXED_REPLAYS_NOTE))]
    _choose_zero3_buckets(plan, calibration)
    plan.recompute_table = []
    plan.elementwise_recompute = False
    plan.offload_layers = plan.offload_layer_bytes = 0
    plan.offload_table = []
    if not plan.grad_ckpt:
        plan.recompute_layers = 0
    elif plan.recompute != "auto":
        plan.recompute_layers = layers if plan.recompute == "all" else int(plan.recompute)
        if isinstance(plan.offload, int):
            plan.offload_layers = plan.offload  # as many of them as are kept below the top ones (memory.py)
    else:
        plan.recompute_layers = layers  # the estimate to start from
        usable = int((plan.usable_memory or 0) / calibration)
        k, _ = fit(memory_input(plan), usable)
        # a re-fit (the data's bound) replaces the earlier records
        plan.adjustments = [a for a in plan.adjustments
                            if a.what not in ("recompute_layers", "recompute_table", "elementwise_recompute",
                                              "offload_layers")]
        if k and plan.kernels == COMPILED_KERNELS and "elementwise-recompute" not in plan.without:
            plan.elementwise_recompute = True  # memory binds: a smaller kept layer means fewer replayed ones
            without, (k, _) = k, fit(memory_input(plan), usable)
            plan.adjustments.append(Adjustment(
                "elementwise_recompute", False, True, f"kept compiled layers save only what needs a GEMM to "
                f"recompute (norm inputs, q, k, v, gate, up): {k} layers replayed at the longest micro-batch "
                f"instead of {without} (--without elementwise-recompute)", "planner"))
        k = _fit_offload(plan, backend, usable, k)
        plan.recompute_layers = k
        tokens = (f"{plan.micro_batch_tokens} tokens, the data's longest micro-batch" if plan.micro_batch_tokens
                  else f"{plan.micro_batch * plan.seq_len} tokens (LBS x MPE)")
        if k != layers:
            plan.adjustments.append(Adjustment("recompute_layers", layers, k, f"the fewest replayed decoder layers "
                                               f"whose estimate fits the usable memory at {tokens}", "planner"))
        if k and "batch-recompute" not in plan.without:
            if not _replays_may_vary(plan):
                plan.notes.append(f"{FIXED_REPLAYS_NOTE}: under ZeRO-3, eager decoder layers that are not fetch "
                                  f"units would change ZeRO-3's fetch order with the replay count")
            else:
                plan.recompute_table = [list(r) for r in recompute_table(memory_input(plan), usable)]
            if plan.recompute_table:
                (small, fewest), (large, most) = plan.recompute_table[0], plan.recompute_table[-1]
                plan.adjustments.append(Adjustment(
                    "recompute_table", k, f"{fewest}-{most} by micro-batch size",
                    f"each micro-batch replays the fewest layers whose estimate fits at its own size: {fewest} up "
                    f"to {small} tokens, {most} at {large} (--without batch-recompute: {k} in every one)",
                    "planner"))
    if plan.offload_layers:
        from .memory import layer_saved_bytes_per_token

        inp = memory_input(plan)
        plan.offload_layer_bytes = inp.micro_batch_tokens * layer_saved_bytes_per_token(inp)
        if plan.recompute == "auto":  # a micro-batch offloads only what its own size needs
            replays = plan.recompute_table or [[inp.micro_batch_tokens, plan.recompute_layers]]
            plan.offload_table = offload_table(inp, int((plan.usable_memory or 0) / calibration), replays)
    plan.memory = estimate(plan).to_dict()
    plan.memory["calibration"] = calibration
    plan.memory["calibrated_total"] = plan.memory["total"] * calibration
    if plan.usable_memory and plan.memory["calibrated_total"] * 2**30 > plan.usable_memory:
        plan.notes.append(f"{OVER_MEMORY}({plan.memory['calibrated_total']:.1f} GiB) exceeds the "
                          f"{plan.usable_memory / 2**30:.1f} GiB usable: expect out-of-memory (use --mbs auto, "
                          f"--recompute auto or more processes)")


# The pace of a decoder layer's forward, as a share of the device's peak FLOP/s for its GEMMs, by which the planner
# times the copies to the host that the forward must hide. On one H200 (7B finetune) 8 layers offloaded over the
# forward of 17 (0.47 a layer, where this pace allows 0.48) were all hidden (docs/performance.md).
OFFLOAD_FORWARD_PACE = 0.5


def _fit_offload(plan: RunPlan, backend: Any, usable: int, replayed: int) -> int:
    """Lever "offload-activations": the fewest replayed layers that fit once some kept layers wait in host memory
    (train/offload.py); returns them. ``--offload auto`` offloads no more layers than the host link moves while the
    forward runs, and only where that replaces replays; ``--offload N`` offloads N (as many as there are kept layers
    below the top offload.LOOKAHEAD).

    The budget: each offloaded layer's saved tensors cross the link once each way, and the forward of the layers
    that are not replayed must hide the copies to the host. A layer's forward is timed as its GEMMs at
    ``OFFLOAD_FORWARD_PACE`` of the device's peak FLOP/s."""
    from .memory import estimate_memory, layer_saved_bytes_per_token
    from .train.flops import llm_layer_matmul_params

    link = backend.host_link()
    if plan.offload == 0 or "offload-activations" in plan.without or not link:
        return replayed
    inp = memory_input(plan)
    saved = layer_saved_bytes_per_token(inp)
    layers = plan.preset.llm.layers
    if plan.offload == "auto":
        peak = backend.peak_flops(plan.device_name, plan.dtype).flops
        if not replayed or not peak:
            return replayed
        # layers offloadable per layer of forward: the forward's time / one layer's copy time (both per token)
        per_layer = (2 * llm_layer_matmul_params(plan.preset) / (OFFLOAD_FORWARD_PACE * peak)) / (saved / link)
        why = f"at most {per_layer:.2f} layers per layer of forward"
    else:
        why = f"--offload {plan.offload}"

    def counts(fewer: int) -> Iterable[int]:
        if plan.offload != "auto":
            return [int(plan.offload)]
        return range(1, int((layers - fewer) * per_layer) + 1)

    for fewer in range(replayed + 1):
        for count in counts(fewer):
            trial = replace(inp, recompute_layers=fewer, offload_layers=count)
            if plan.offload == "auto" and trial.offloaded_layers < count:
                continue  # fewer kept layers than the count
            if trial.offloaded_layers and estimate_memory(trial).total <= usable:
                count = plan.offload_layers = trial.offloaded_layers
                plan.adjustments.append(Adjustment(
                    "offload_layers", 0, count, f"{count} kept decoder layers wait in host memory for the backward, "
                    f"{saved} bytes a token each, copied beside the compute ({link / 1e9:.0f} GB/s each way; "
                    f"{why}): {fewer} layers replayed at the longest micro-batch instead of {replayed} "
                    f"(--without offload-activations)", "planner"))
                return fewer
    return replayed


BUCKETS_NOTE = "ZeRO-3 buckets stay LLaVA's"
FIXED_REPLAYS_NOTE = "every micro-batch replays as many layers as the longest"


def _replays_may_vary(plan: RunPlan) -> bool:
    """Lever "batch-recompute" needs the replay invisible to ZeRO-3: under ZeRO-3 a replayed eager layer fetches its
    sub-modules' parameters once more, so a replay count that changes between micro-batches would change the
    fetch order that ZeRO-3's prefetch records in the first step and replays after it. A decoder layer that is one
    fetch unit (compiled layers) is fetched once either way; ZeRO-2 fetches nothing."""
    from .train.ds_config import layers_are_units

    return plan.zero_stage != 3 or layers_are_units(plan.deepspeed_overrides().get("zero_optimization", {}))


def _choose_zero3_buckets(plan: RunPlan, calibration: float) -> None:
    """Lever "zero3-buckets": the larger prefetch and reduce buckets cost 2 GB of buffers, so ZeRO-3 takes them
    where they fit with every layer replayed at the plan's largest micro-batch (not on a 32 GiB BI-V150 at
    micro-batch 4, where they would cost a micro-batch)."""
    plan.zero3_buckets = plan.zero_stage == 3 and "zero3-buckets" not in plan.without
    if plan.zero3_buckets and plan.usable_memory:
        every_layer_replayed = replace(plan, recompute_layers=plan.preset.llm.layers if plan.grad_ckpt else 0)
        plan.zero3_buckets = estimate(every_layer_replayed).total * calibration <= plan.usable_memory
        if not plan.zero3_buckets:
            plan.notes.append(f"{BUCKETS_NOTE} (hidden² elements): 5e8-element ones would not fit at micro-batch "
                              f"{plan.micro_batch}")
    plan.adjustments = [a for a in plan.adjustments if a.what != "zero3_buckets"]  # a re-fit replaces the record
    if plan.zero3_buckets:
        plan.adjustments.append(Adjustment("zero3_buckets", "hidden² (LLaVA's zero3.json)", "5e8 elements",
                                           "ZeRO-3 prefetch and reduce buckets of 5e8 elements: fewer, larger "
                                           "collectives that hide under compute (--without zero3-buckets)",
                                           "accelbench"))


def _resolve_kernels(plan: RunPlan, backend: Any) -> None:
    offered = [k for k in backend.kernels().sets if all(p in backend.machine.packages for p in k.packages)]
    if "compiled-layers" in plan.without and any(k.compiled for k in offered):
        plan.notes.append(f"compiled layers ({', '.join(k.name for k in offered if k.compiled)}) available "
                          f"but off (--without compiled-layers)")
        offered = [k for k in offered if not k.compiled]
    if not offered:
        return
    if "fused-kernels" in plan.without:
        plan.notes.append(f"fused kernels {offered[0].name} available but off (--without fused-kernels)")
        return
    plan.record(plan.change("kernels", offered[0].name, offered[0].description or
                            f"backend {backend.name} offers {offered[0].name}", backend.name))


def _check_compiled_layer_config(plan: RunPlan) -> None:
    """A --ds-config merged over the settings compiled layers need under ZeRO-3 can undo them: say so."""
    if plan.zero_stage != 3 or plan.kernels != COMPILED_KERNELS or not plan.ds_overrides:
        return
    from .train.ds_config import layers_are_units

    zero = plan.deepspeed_overrides().get("zero_optimization", {})
    if zero.get("memory_efficient_linear", True) or not layers_are_units(zero):
        plan.notes.append("--ds-config sets zero_optimization.leaf_module or memory_efficient_linear against what "
                          "compiled layers need: ZeRO-3's hooks or its linear then break the compiled graph "
                          "(drop those keys, or run --without compiled-layers)")


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
    usable = [i for i in att.implementations if all(p in packages for p in i.packages)
              and not (i.varlen and "packing" in plan.without)]
    if not usable:
        raise ConfigError(f"backend {backend.name} lists no attention implementation whose packages are installed")
    if plan.attn_implementation != usable[0].name:
        missing = [i for i in att.implementations if i.name == plan.attn_implementation
                   and not all(p in packages for p in i.packages)]
        if "packing" in plan.without and att.implementations[0].varlen:
            why = "--without packing: padded micro-batches need an implementation without varlen input"
        elif missing:
            why = f"{plan.attn_implementation} needs {', '.join(missing[0].packages)}, not importable here"
        else:
            why = f"backend {backend.name} prefers {usable[0].name}"
        plan.record(plan.change("attn_implementation", usable[0].name, why, backend.name))
    plan.packed = usable[0].varlen
    _resolve_kernels(plan, backend)
    for key, value in usable[0].env.items():
        if plan.env.get(key) != value:
            plan.adjustments.append(Adjustment(f"env {key}", plan.env.get(key), value,
                                               f"required by attention implementation {usable[0].name}", backend.name))
            plan.env[key] = value
