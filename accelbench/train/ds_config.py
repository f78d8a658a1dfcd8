"""DeepSpeed config for the LLaVA benchmark.

Mirrors LLaVA's ``scripts/zero2.json`` / ``scripts/zero3.json`` with every ``"auto"`` resolved the
way HF's ``HfTrainerDeepSpeedConfig`` resolves it, so the memory model (``accelbench.memory``) can
read concrete bucket sizes from the very dict that DeepSpeed receives.
"""
from __future__ import annotations

import copy
from typing import Any

DTYPES = ("bf16", "fp16", "fp32")

# Large enough that DeepSpeed never prints its per-step log line during a benchmark.
_STEPS_PER_PRINT = 10**12


def _zero2(hidden_size: int) -> dict[str, Any]:
    del hidden_size  # ZeRO-2 buckets are fixed in LLaVA's zero2.json, not derived from the model
    return {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        # Ints, not 5e8 floats: DeepSpeed's pydantic models accept both, but the memory model
        # multiplies them and we want exact integer byte counts.
        "allgather_bucket_size": 500_000_000,
        "reduce_bucket_size": 500_000_000,
    }


def llava_persistence_threshold(hidden_size: int) -> int:
    """LLaVA's ZeRO-3 persistence threshold, HF's "auto": tensors of up to 10·hidden elements (the norms) stay whole."""
    return 10 * hidden_size


def _zero3(hidden_size: int) -> dict[str, Any]:
    h2 = hidden_size * hidden_size
    return {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1_000_000_000,
        # HF: reduce_bucket_size "auto" -> hidden², prefetch "auto" -> int(0.9·hidden²),
        # persistence threshold "auto" -> 10·hidden.
        "reduce_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_param_persistence_threshold": llava_persistence_threshold(hidden_size),
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": True,
    }


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; nested dicts merge key by key instead of being replaced."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ZeRO-3 buckets sized for LLaVA's 7B/13B layers instead of HF's "auto" (hidden² elements, 26M at 13B):
# that is smaller than one 13B MLP weight (71M), so the prefetcher looks one module ahead and every weight's
# gradient is its own reduce-scatter. 5e8 elements (1 GB in bf16) covers about 1.5 13B decoder layers.
# On 2 H200s (13B finetune) this cut NCCL time per step from 0.73 s to 0.43 s and the communication not
# hidden under compute from 0.19 s to 0.06 s (docs/performance.md). Lever "zero3-buckets" (plan.LEVERS).
ZERO3_BUCKETS: dict[str, Any] = {"zero_optimization": {"stage3_prefetch_bucket_size": 500_000_000,
                                                       "reduce_bucket_size": 500_000_000}}


# The LLM decoder layer of every LLaVA-1.5 case (Vicuna). DeepSpeed's documented ``leaf_module`` option makes it
# one ZeRO-3 fetch unit (benchmarks/gpu/ds/zero3-leaf.json). On its own it did not pay on 2 and 4 H200s
# (docs/performance-history.md); compiled decoder layers need it (COMPILED_LAYERS), and the memory model counts
# what it holds.
DECODER_LAYER_CLASS = "LlamaDecoderLayer"
# The vision tower's encoder layer (CLIP ViT-L/14-336): frozen, 12.6M parameters each, run without autograd. As one
# fetch unit its forward costs ZeRO-3 one fetch and release instead of one around each of its modules.
VISION_LAYER_CLASS = "CLIPEncoderLayer"

# ZeRO-3 settings under which a decoder layer's forward can be one torch.compile graph: ZeRO-3's fetch and release
# hooks run only around the whole layer (not inside it, where each would break the graph), and nn.functional.linear
# stays torch's own instead of ZeRO-3's memory-efficient autograd function. The vision layer is made a unit with it.
COMPILED_LAYERS: dict[str, Any] = {"zero_optimization": {
    "leaf_module": {"classes": [DECODER_LAYER_CLASS, VISION_LAYER_CLASS]}, "memory_efficient_linear": False}}


def layers_are_units(zero: dict[str, Any]) -> bool:
    """Whether a ZeRO config makes each decoder layer one fetch unit: DeepSpeed's ``leaf_module.classes`` naming the
    class, bare or qualified (its other forms, module names and the granularity threshold, are not read)."""
    classes = (zero.get("leaf_module") or {}).get("classes") or []
    return any(c.rsplit(".", 1)[-1] == DECODER_LAYER_CLASS for c in classes)


def tuned_overrides(zero3_buckets: bool, user: dict[str, Any] | None, compiled_layers: bool = False,
                    tower_threshold: int | None = None) -> dict[str, Any]:
    """What is merged over LLaVA's DeepSpeed config: the tuned ZeRO-3 buckets where chosen, the settings compiled
    layers need under ZeRO-3, the persistence threshold that keeps the frozen vision tower whole (lever
    "whole-tower", ``memory.tower_threshold``), then the user's --ds-config. The plan and the HF Trainer peer both
    build theirs here, so their configs differ only by what the compiled layers need."""
    out = deep_merge(ZERO3_BUCKETS if zero3_buckets else {}, COMPILED_LAYERS if compiled_layers else {})
    if tower_threshold is not None:
        out = deep_merge(out, {"zero_optimization": {"stage3_param_persistence_threshold": tower_threshold}})
    return deep_merge(out, user or {})


# Keys the plan owns: a user file setting them would contradict the batch sizes, precision or stage that
# the report states. Each maps to the option that sets it.
_PLAN_OWNED = {"train_micro_batch_size_per_gpu": "--mbs", "gradient_accumulation_steps": "--gas",
               "train_batch_size": "--mbs and --gas", "bf16": "the case's dtype", "fp16": "the case's dtype",
               "optimizer": "the trainer (AdamW, the case's --lr)", "scheduler": "the trainer (the case's schedule)"}


def load_overrides(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON (``--ds-config``), checked: what it sets is deep-merged over accelbench's
    config. Keys the plan owns are refused with the option that sets them."""
    import json

    from ..errors import ConfigError

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"--ds-config {path!r} cannot be read ({exc.strerror}): give a DeepSpeed JSON file") from None
    except ValueError as exc:
        raise ConfigError(f"--ds-config {path!r} is not valid JSON ({exc}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--ds-config {path!r} must hold a JSON object like "
                          f'{{"zero_optimization": {{"stage3_prefetch_bucket_size": 500000000}}}}')
    owned = [f"{k} (set by {_PLAN_OWNED[k]})" for k in data if k in _PLAN_OWNED]
    if "stage" in (data.get("zero_optimization") or {}):
        owned.append("zero_optimization.stage (set by --zero-stage)")
    if owned:
        raise ConfigError(f"--ds-config {path!r} sets what the plan owns: {', '.join(owned)}; drop "
                          f"{'them' if len(owned) > 1 else 'it'} from the file")
    return data


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    dtype: str,
    hidden_size: int,
    grad_clip: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete DeepSpeed config dict (no ``"auto"`` left).

    ``hidden_size`` is the LLM hidden size (HF uses ``model.config.hidden_size``, the text model's
    for Llava). ``overrides`` is deep-merged last, e.g. ``{"zero_optimization": {"overlap_comm": False}}``.
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3 (LLaVA ships zero2.json/zero3.json), got {zero_stage}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum),
                        ("world_size", world_size), ("hidden_size", hidden_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        # LLaVA's fp16 block (dynamic loss scaling), enabled only for fp16.
        "fp16": {
            "enabled": dtype == "fp16",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": _zero2(hidden_size) if zero_stage == 2 else _zero3(hidden_size),
        # The trainer hands DeepSpeed a torch AdamW; a DeepSpeed "optimizer" entry would JIT-build
        # FusedAdam, and ZeRO refuses client optimizers it has not tested unless told otherwise.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if overrides:
        config = deep_merge(config, overrides)
    return config
