"""Analytic peak device memory of one LLaVA-1.5 training step under DeepSpeed ZeRO-2/3.

Every term is a physical allocation with its formula in ``docs/memory-model.md``.  The peak is
``static + max(backward phase, optimizer-step phase)``, then an allocator/framework allowance:

* static: parameters (working copy, ZeRO-3 partition + persistent), gradient partition, reduce
  buckets, fp32 master weights, Adam moments -- alive for the whole step;
* backward phase (the turnaround from forward to backward, where activations peak): stored
  activations, the larger of the loss/logits working set and one decoder layer's backward working
  set, ZeRO-3's gathered parameters, the largest full-size parameter gradient;
* optimizer-step phase (activations are gone): the fp32 gradient copy of one sub-group and the
  foreach-AdamW temporary of the same size.

plus ``fragmentation`` (a fraction of the peak phase's dynamic bytes) and ``framework`` (fixed).
``MemoryEstimate.terms`` holds the static terms plus the terms of whichever phase is larger, so they
sum to ``total``; ``phase_terms`` keeps both phases for inspection.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from accelbench.cases import ModelPreset

GiB = 1024**3
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GiB}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTN_IMPLS = ("flash_attention_2", "sdpa", "eager")
STAGES = ("pretrain", "finetune")
FP32 = 4


@dataclass(frozen=True)
class MemoryPlanInput:
    preset: ModelPreset
    stage: str  # "pretrain" (projector trained) | "finetune" (projector + LLM trained)
    zero_stage: int  # 2 | 3
    dp_size: int
    micro_batch: int
    seq_len: int  # tokens per sample incl. the 576 image tokens (padded length of the batch)
    dtype: str = "bf16"
    grad_ckpt: bool = True
    attn_impl: str = "flash_attention_2"
    # From accelbench.train.ds_config.deepspeed_config; None -> that function's defaults.
    ds_config: dict[str, Any] | None = field(default=None, compare=False)
    fragmentation: float = 0.10  # caching-allocator slack, as a fraction of the modelled bytes
    framework_bytes: int = GiB  # CUDA context, cuBLAS/NCCL workspaces (CPU backend: 0)
    images_per_sample: int = 1  # LLaVA-1.5 data: one image per sample


@dataclass(frozen=True)
class MemoryEstimate:
    terms: dict[str, int]  # bytes; sums to total
    total: int  # bytes
    peak_phase: str  # "backward" | "optimizer_step"
    phase_terms: dict[str, dict[str, int]]  # both phases' dynamic terms, bytes

    def to_dict(self, unit: str = "GiB") -> dict[str, Any]:
        scale = _UNITS[unit]
        return {
            "unit": unit,
            "total": self.total / scale,
            "peak_phase": self.peak_phase,
            "terms": {k: v / scale for k, v in self.terms.items()},
            "phase_terms": {p: {k: v / scale for k, v in t.items()} for p, t in self.phase_terms.items()},
        }


# ---------------------------------------------------------------------------------------------
# Parameter inventory
# ---------------------------------------------------------------------------------------------

def parameter_tensors(preset: ModelPreset) -> list[tuple[str, int]]:
    """(component, numel) for every parameter tensor of LlavaForConditionalGeneration."""
    v, t = preset.vision, preset.llm
    vh, vi, h, i = v.hidden, v.intermediate, t.hidden, t.intermediate
    kv = t.kv_heads * t.head_dim
    out: list[tuple[str, int]] = [
        ("vision", 3 * v.patch_size**2 * vh), ("vision", vh), ("vision", (v.patches + 1) * vh),
        ("vision", vh), ("vision", vh),  # pre_layrnorm
    ]
    clip_layer = [vh * vh, vh] * 4 + [vh, vh, vh * vi, vi, vi * vh, vh, vh, vh]
    out += [("vision", n) for _ in range(v.layers) for n in clip_layer]
    out += [("vision", vh), ("vision", vh)]  # post_layernorm
    out += [("projector", vh * h), ("projector", h), ("projector", h * h), ("projector", h)]
    out.append(("embed", t.vocab * h))
    llama_layer = [h * h, h * kv, h * kv, h * h, h * i, h * i, i * h, h, h]
    out += [("llm", n) for _ in range(t.layers) for n in llama_layer]
    out += [("llm", h), ("lm_head", t.vocab * h)]
    return out


def _trainable(component: str, stage: str) -> bool:
    return component == "projector" or (stage == "finetune" and component != "vision")


def trainable_params(preset: ModelPreset, stage: str) -> int:
    return sum(n for c, n in parameter_tensors(preset) if _trainable(c, stage))


def _largest_trainable_tensor(preset: ModelPreset, stage: str) -> int:
    return max(n for c, n in parameter_tensors(preset) if _trainable(c, stage))


def _persistent_params(preset: ModelPreset, threshold: int) -> int:
    """ZeRO-3 keeps tensors with numel <= stage3_param_persistence_threshold whole on every rank."""
    return sum(n for _, n in parameter_tensors(preset) if n <= threshold)


# ---------------------------------------------------------------------------------------------
# Static terms
# ---------------------------------------------------------------------------------------------

def _zero_cfg(inp: MemoryPlanInput) -> dict[str, Any]:
    cfg = inp.ds_config
    if cfg is None:
        from accelbench.train.ds_config import deepspeed_config

        cfg = deepspeed_config(zero_stage=inp.zero_stage, micro_batch=inp.micro_batch, grad_accum=1,
                               world_size=inp.dp_size, dtype=inp.dtype, hidden_size=inp.preset.llm.hidden)
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage", inp.zero_stage) != inp.zero_stage:
        raise ValueError(f"ds_config has ZeRO stage {zero.get('stage')}, input says {inp.zero_stage}")
    return zero


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _static_terms(inp: MemoryPlanInput, zero: dict[str, Any]) -> dict[str, int]:
    p, b, dp = inp.preset, DTYPE_BYTES[inp.dtype], inp.dp_size
    total_params = sum(n for _, n in parameter_tensors(p))
    n_train = trainable_params(p, inp.stage)
    train_part = _ceil_div(n_train, dp)
    terms: dict[str, int] = {}
    if inp.zero_stage == 3:
        # deepspeed.initialize wraps the whole Llava model: frozen CLIP is partitioned too.
        persistent = _persistent_params(p, int(zero.get("stage3_param_persistence_threshold", 100_000)))
        terms["params_partition"] = _ceil_div(total_params - persistent, dp) * b
        terms["params_persistent"] = persistent * b
        # Flat gradient-partition buffer (grad_accum_dtype defaults to the model dtype) and one
        # contiguous IPG bucket per comm dtype.
        terms["grads_partition"] = train_part * b
        terms["reduce_bucket"] = int(zero.get("reduce_bucket_size", 500_000_000)) * b
    else:
        terms["params_full"] = total_params * b  # ZeRO-2 keeps every parameter whole
        terms["grads_partition"] = train_part * b  # grads_in_partition buffer
        # IPG buckets: double-buffered when overlap_comm; ZeRO-2 allocates them whatever the
        # trainable size.  allgather_bucket_size only shards the post-step all-gather, which
        # writes in place into the flat bf16 buffer: no allocation.
        n_buffers = 2 if zero.get("overlap_comm", False) else 1
        if zero.get("contiguous_gradients", True):
            terms["reduce_bucket"] = n_buffers * int(zero.get("reduce_bucket_size", 500_000_000)) * b
        else:
            terms["reduce_bucket"] = 0
    # Mixed precision keeps an fp32 master copy of the trainable partition; fp32 training does not.
    terms["master_params_fp32"] = train_part * FP32 if b < FP32 else 0
    terms["adam_moments_fp32"] = 2 * train_part * FP32
    return terms


# ---------------------------------------------------------------------------------------------
# Backward-phase terms
# ---------------------------------------------------------------------------------------------

def layer_saved_bytes_per_token(inp: MemoryPlanInput) -> int:
    """Bytes autograd saves per token inside one Llama decoder layer (no score matrix).

    finetune (weights trained): 2 RMSNorms × (fp32 input 4h + bf16 normed 2h), q, k, v (post-rotary)
    and the attention output kept by the attention kernel (h + 2·kv + h), its fp32 logsumexp
    (4·heads), MLP gate, act, up and act·up (4i).
    pretrain (weights frozen): linear layers keep no inputs and the norm weight-mul keeps nothing,
    so the normed bf16 tensors and down_proj's input (act·up) are not saved.
    """
    t, b = inp.preset.llm, DTYPE_BYTES[inp.dtype]
    h, i, kv = t.hidden, t.intermediate, t.kv_heads * t.head_dim
    attn = (h + kv + kv + h) * b  # q, k, v (post-rotary) and the attention output
    if inp.stage == "finetune":
        norms = 2 * (FP32 * h + b * h)
        mlp = 4 * i * b
    else:
        norms = 2 * FP32 * h
        mlp = 3 * i * b
    lse = FP32 * t.heads if inp.attn_impl != "eager" else 0  # flash/SDPA logsumexp
    return norms + attn + mlp + lse


def _scores_bytes(inp: MemoryPlanInput) -> int:
    """Eager attention materialises the s×s probabilities: fp32 softmax output (saved by softmax
    backward) + its bf16 cast (saved by the AV matmul); backward adds their fp32 and bf16 grads."""
    if inp.attn_impl != "eager":
        return 0
    t, b = inp.preset.llm, DTYPE_BYTES[inp.dtype]
    return inp.micro_batch * t.heads * inp.seq_len**2 * (FP32 + b)


def _backward_terms(inp: MemoryPlanInput, zero: dict[str, Any]) -> dict[str, int]:
    p, b = inp.preset, DTYPE_BYTES[inp.dtype]
    t, v = p.llm, p.vision
    tokens = inp.micro_batch * inp.seq_len
    n_img = inp.micro_batch * inp.images_per_sample
    saved_layer = tokens * layer_saved_bytes_per_token(inp) + _scores_bytes(inp)
    terms: dict[str, int] = {}

    if inp.grad_ckpt:  # only each decoder layer's input survives the forward
        terms["act_checkpoints"] = t.layers * tokens * t.hidden * b
    else:
        terms["act_all_layers"] = t.layers * saved_layer
    # The attention mask is shared by all layers: eager adds a float 4D mask, SDPA a bool one
    # (padded batches); flash-attention takes the 2-D mask.
    mask_bytes = {"eager": b, "sdpa": 1, "flash_attention_2": 0}[inp.attn_impl]
    terms["attention_mask"] = inp.micro_batch * inp.seq_len**2 * mask_bytes
    # Projector: linear_1 input, GELU input, linear_2 input (all needed: the projector trains).
    terms["act_projector"] = n_img * v.image_tokens * (v.hidden + 2 * t.hidden) * b
    # CLIP: transformers' checkpointing hooks make the patch embeddings require grad, so every
    # checkpointed CLIP layer keeps its input (577 positions incl. CLS); otherwise nothing is saved
    # but the selected hidden state.
    clip_layers_kept = v.layers if inp.grad_ckpt else 1
    terms["act_vision"] = n_img * (v.patches + 1) * v.hidden * b * clip_layers_kept
    # Final RMSNorm keeps its fp32 input; finetune also keeps the bf16 normed output (lm_head's
    # input, needed for lm_head's weight gradient and the norm weight's gradient).
    terms["act_final_norm"] = tokens * t.hidden * (FP32 + (b if inp.stage == "finetune" else 0))

    # Layer backward: (recomputed) saved tensors + grads in flight inside the MLP backward
    # (d(act·up), d(act), d(up) or d(gate): 3 i-wide; incoming and residual grads: 2 h-wide).
    layer_ws = (saved_layer if inp.grad_ckpt else 0) + tokens * (3 * t.intermediate + 2 * t.hidden) * b
    layer_ws += _scores_bytes(inp)  # eager: grads of the probabilities (fp32 + bf16)
    # Loss: bf16 logits (held by the model output) + fp32 log-softmax output (saved) + fp32 grad
    # of that output (nll_loss backward is dense) + fp32 grad of the logits (log_softmax backward).
    loss_ws = tokens * t.vocab * (b + 3 * FP32)
    if loss_ws >= layer_ws:
        terms["logits_loss"] = loss_ws
    else:
        terms["layer_backward"] = layer_ws

    # Full-size gradient of the largest trainable tensor before it is copied into the bucket.
    terms["largest_param_grad"] = _largest_trainable_tensor(p, inp.stage) * b
    if inp.zero_stage == 3:
        terms["params_gathered"] = _gathered_params(inp, zero) * b
    return terms


def _gathered_params(inp: MemoryPlanInput, zero: dict[str, Any]) -> int:
    """ZeRO-3 parameters gathered at the forward->backward turnaround.

    A module's parameters are not released when they are used again within
    ``stage3_max_reuse_distance`` numel of fetches.  At the turnaround lm_head (used again at once)
    and the trailing decoder layers k = 1, 2, ... are kept while their reuse distance
    2·(k-1)·P_layer + 2·V·h (forward of the later layers, lm_head forward and backward, replay and
    backward of the later layers) stays under the limit.  The prefetcher then adds up to
    ``stage3_prefetch_bucket_size``, bounded by ``stage3_max_live_parameters``.
    """
    t = inp.preset.llm
    reuse = int(zero.get("stage3_max_reuse_distance", 1_000_000_000))
    max_live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
    head, layer = t.vocab * t.hidden, t.layer_params
    kept_layers = 1  # the layer being replayed is always gathered
    while kept_layers < t.layers and 2 * kept_layers * layer + 2 * head < reuse:
        kept_layers += 1
    window = head + kept_layers * layer
    return window + min(prefetch, max(0, max_live - window))


# ---------------------------------------------------------------------------------------------
# Optimizer-step phase
# ---------------------------------------------------------------------------------------------

def _step_terms(inp: MemoryPlanInput, zero: dict[str, Any]) -> dict[str, int]:
    """fp32 copy of one sub-group's gradient + torch foreach AdamW's sqrt(v) temporary."""
    part = _ceil_div(trainable_params(inp.preset, inp.stage), inp.dp_size)
    if inp.zero_stage == 3:
        part = min(part, int(zero.get("sub_group_size", 1_000_000_000)))
    return {"step_fp32_grad": part * FP32, "step_adam_temp": part * FP32}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _validate(inp: MemoryPlanInput) -> None:
    if inp.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {inp.stage!r}")
    if inp.zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {inp.zero_stage}")
    if inp.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {inp.dtype!r}")
    if inp.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {inp.attn_impl!r}")
    if inp.dp_size < 1 or inp.micro_batch < 1 or inp.seq_len < 1:
        raise ValueError("dp_size, micro_batch and seq_len must be >= 1")
    if inp.fragmentation < 0 or inp.framework_bytes < 0:
        raise ValueError("fragmentation and framework_bytes must be >= 0")


def estimate_memory(inp: MemoryPlanInput) -> MemoryEstimate:
    """Peak bytes per device for one training step (see module docstring for the structure)."""
    _validate(inp)
    zero = _zero_cfg(inp)
    static = _static_terms(inp, zero)
    phases = {"backward": _backward_terms(inp, zero), "optimizer_step": _step_terms(inp, zero)}
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    terms = {**static, **phases[peak_phase]}
    # Static buffers are allocated once, at init, in exact sizes; fragmentation comes from the
    # per-step churn of activations, gathered parameters and step temporaries.
    terms["fragmentation"] = int(inp.fragmentation * sum(phases[peak_phase].values()))
    terms["framework"] = int(inp.framework_bytes)
    return MemoryEstimate(terms=terms, total=sum(terms.values()), peak_phase=peak_phase, phase_terms=phases)


def fit_micro_batch(inp: MemoryPlanInput, usable_bytes: int, max_mbs: int = 256) -> tuple[int, MemoryEstimate]:
    """Largest micro-batch (<= max_mbs) whose estimate fits in ``usable_bytes``; 0 if none does.

    The returned estimate is for the chosen micro-batch (for micro-batch 1 when none fits, so the
    caller can report by how much it misses).
    """
    best, best_est = 0, estimate_memory(replace(inp, micro_batch=1))
    for mbs in range(1, max_mbs + 1):  # memory is monotone in mbs: stop at the first miss
        est = estimate_memory(replace(inp, micro_batch=mbs))
        if est.total > usable_bytes:
            break
        best, best_est = mbs, est
    return best, best_est
