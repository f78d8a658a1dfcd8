"""Analytic peak device memory of one LLaVA-1.5 training step under DeepSpeed ZeRO-2/3.

Every term is a physical allocation with its formula in ``docs/memory-model.md``.  The peak is
``static + max(phases)``, then an allocator/framework allowance:

* static: parameters (working copy, ZeRO-3 partition + persistent), gradient partition, ZeRO-3's
  reduce bucket, fp32 master weights, Adam moments -- alive for the whole step;
* backward phase (the turnaround from forward to backward, where activations peak): stored
  activations, the larger of the loss/logits working set and one decoder layer's backward working
  set, ZeRO-3's gathered parameters, the largest full-size parameter gradient, and ZeRO-2's reduce
  buckets when a trainable gradient arrives while the activations are alive (finetune);
* projector-backward phase (ZeRO-2 pretrain only): ZeRO-2 allocates its reduce buckets at the first
  trainable gradient, which in pretrain is the projector's -- after the whole LLM backward, when
  only the CLIP/projector activations are left;
* optimizer-step phase (activations are gone): the fp32 gradient copy of one sub-group and the
  foreach-AdamW temporary of the same size.

plus ``fragmentation`` (a fraction of the peak phase's dynamic bytes) and ``framework`` (fixed).
``MemoryEstimate.terms`` holds the static terms plus the terms of whichever phase is largest, so they
sum to ``total``; ``phase_terms`` keeps every phase for inspection.  ``allocated`` is ``total``
without the two allowances: what ``torch.cuda.max_memory_allocated()`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from accelbench.cases import ModelPreset

GiB = 1024**3
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GiB}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTN_IMPLS = ("flash_attention_2", "sdpa", "eager")
# transformers' own modules, Liger's fused RMSNorm/SwiGLU/RoPE, or Inductor's (torch.compile'd decoder layers)
KERNELS = ("hf", "liger", "inductor")
STAGES = ("pretrain", "finetune")
FP32 = 4

# offloaded layers copied back ahead of the backward (train/offload.py); the top ones are never offloaded
OFFLOAD_LOOKAHEAD = 2


def offloaded_positions(layers: int, replayed: int, count: int) -> list[int]:
    """Which decoder layers to offload: ``count`` of them, spread evenly over the layers that are not replayed (the
    first ``replayed``), below the top ``OFFLOAD_LOOKAHEAD``.

    Spread, so that each layer's copy to the host has the forward of the layers after it to hide under; below the top
    ones, so that the copy back of the first one the backward reaches starts while layers above it run theirs, whose
    kept activations are freed as the copies arrive."""
    lo, hi = replayed, layers - OFFLOAD_LOOKAHEAD
    count = min(count, max(0, hi - lo))
    return [lo + (j * (hi - lo)) // count for j in range(count)]


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
    # "hf": transformers' loss, logits at every position; "objective": accelbench's, logits only at
    # target positions, in chunks of ``loss_chunk`` tokens recomputed in backward (train/objective.py)
    loss_impl: str = "hf"
    loss_chunk: int = 4096
    packed: bool = False  # one unpadded row per micro-batch: no attention mask
    # Tokens in the largest micro-batch; None -> micro_batch × seq_len (every sample at the cap).
    # A packed run knows it from the data: the sum of the micro_batch longest samples.
    tokens: int | None = None
    # Decoder layers whose forward is checkpointed (replayed in backward) when grad_ckpt;
    # None -> all of them.  The rest keep their activations.
    recompute_layers: int | None = None
    kernels: str = "hf"
    # compiled layers (kernels "inductor") that recompute their element-wise results and attention in the
    # backward from what the GEMMs keep (lever "elementwise-recompute", train/kernels.py)
    elementwise_recompute: bool = False
    # Kept decoder layers whose saved tensors wait in host memory for the backward (lever "offload-activations",
    # train/offload.py); at most the kept layers below the top OFFLOAD_LOOKAHEAD
    offload_layers: int = 0

    @property
    def micro_batch_tokens(self) -> int:
        return self.tokens if self.tokens is not None else self.micro_batch * self.seq_len

    @property
    def checkpointed_layers(self) -> int:
        if not self.grad_ckpt:
            return 0
        return self.preset.llm.layers if self.recompute_layers is None else self.recompute_layers

    @property
    def offloaded_layers(self) -> int:
        return len(offloaded_positions(self.preset.llm.layers, self.checkpointed_layers, self.offload_layers))


@dataclass(frozen=True)
class MemoryEstimate:
    terms: dict[str, int]  # bytes; sums to total
    total: int  # bytes
    peak_phase: str  # "backward" | "projector_backward" | "optimizer_step"
    phase_terms: dict[str, dict[str, int]]  # every phase's dynamic terms, bytes

    @property
    def allocated(self) -> int:
        """Bytes held by live tensors at the peak (``torch.cuda.max_memory_allocated``): ``total``
        without the allocator slack and the CUDA context/NCCL buffers, which that counter excludes."""
        return self.total - self.terms.get("fragmentation", 0) - self.terms.get("framework", 0)

    def to_dict(self, unit: str = "GiB") -> dict[str, Any]:
        scale = _UNITS[unit]
        return {
            "unit": unit,
            "total": self.total / scale,
            "allocated": self.allocated / scale,
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


def tower_threshold(preset: ModelPreset) -> int:
    """The persistence threshold that keeps the vision tower's encoder layers whole on every rank (lever
    "whole-tower"): their largest tensor, the MLP weight (1024 x 4096 in CLIP ViT-L). In LLaVA-1.5 that keeps the
    whole tower (its patch and position embeddings are smaller) and no decoder weight (the smallest is hidden²),
    but the projector's first linear (1024 x hidden) at 7B. Never below LLaVA's own threshold (HF's "auto",
    10·hidden), which keeps the norms whole."""
    from accelbench.train.ds_config import llava_persistence_threshold

    v = preset.vision
    return max(llava_persistence_threshold(preset.llm.hidden), v.hidden * max(v.hidden, v.intermediate))


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
        # deepspeed.initialize wraps the whole Llava model: frozen CLIP is partitioned too, unless the
        # persistence threshold keeps it whole. A persistent tensor keeps its partition beside its whole copy.
        persistent = _persistent_params(p, int(zero.get("stage3_param_persistence_threshold", 100_000)))
        terms["params_partition"] = _ceil_div(total_params, dp) * b
        terms["params_persistent"] = persistent * b
        # Flat gradient-partition buffer (grad_accum_dtype defaults to the model dtype) and one
        # contiguous IPG bucket per comm dtype.
        terms["grads_partition"] = train_part * b
        terms["reduce_bucket"] = int(zero.get("reduce_bucket_size", 500_000_000)) * b
    else:
        terms["params_full"] = total_params * b  # ZeRO-2 keeps every parameter whole
        # grads_in_partition buffer (allocated at the first trainable gradient, kept through the
        # step).  ZeRO-2's reduce buckets are not static: see _zero2_reduce_buckets.
        terms["grads_partition"] = train_part * b
    # Mixed precision keeps an fp32 master copy of the trainable partition; fp32 training does not.
    terms["master_params_fp32"] = train_part * FP32 if b < FP32 else 0
    terms["adam_moments_fp32"] = 2 * train_part * FP32
    return terms


# ---------------------------------------------------------------------------------------------
# Backward-phase terms
# ---------------------------------------------------------------------------------------------

def layer_saved_bytes_per_token(inp: MemoryPlanInput) -> int:
    """Bytes autograd saves per token inside one Llama decoder layer (no score matrix).

    transformers' modules (kernels "hf"):
    finetune (weights trained): 2 RMSNorms × (fp32 input 4h + bf16 cast 2h + bf16 normed 2h), q, k, v (post-rotary)
    and the attention output kept by the attention kernel (h + 2·kv + h), its fp32 logsumexp
    (4·heads), MLP gate, act, up and act·up (4i).
    pretrain (weights frozen): linear layers keep no inputs and the norm weight-mul keeps nothing,
    so the normed bf16 tensors and down_proj's input (act·up) are not saved.
    Liger's fused kernels: each RMSNorm keeps its bf16 input and an fp32 rstd per token (finetune
    also the normed output, for the projections' weight gradients); SwiGLU keeps gate and up and
    recomputes the activation (finetune also down_proj's input, act·up).
    Inductor (compiled decoder layers) is counted as Liger: its default partitioner saves the same matmul inputs
    and recomputes element-wise results where that is cheaper; the measured peak on H200 checks it
    (docs/performance.md).
    Inductor with lever "elementwise-recompute" keeps only what needs no GEMM to recompute: each
    RMSNorm's input (the layer's input and the residual after attention) and fp32 rstd, q, k, v and the MLP's gate
    and up. The normed outputs, the attention (output and logsumexp) and act·up are recomputed in the backward
    (tests/test_compiled_saves.py counts the saved tensors).
    """
    t, b = inp.preset.llm, DTYPE_BYTES[inp.dtype]
    h, i, kv = t.hidden, t.intermediate, t.kv_heads * t.head_dim
    finetune = inp.stage == "finetune"
    if inp.kernels == "inductor" and inp.elementwise_recompute:  # the same in pretrain: nothing more is needed
        return 2 * (b * h + FP32) + (h + 2 * kv) * b + 2 * i * b
    attn = (h + kv + kv + h) * b  # q, k, v (post-rotary) and the attention output
    if inp.kernels in ("liger", "inductor"):
        norms = 2 * (b * h + FP32 + (b * h if finetune else 0))
        mlp = (3 if finetune else 2) * i * b
    elif finetune:
        norms = 2 * (FP32 * h + 2 * b * h)
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


def _zero2_reduce_buckets(inp: MemoryPlanInput, zero: dict[str, Any]) -> int:
    """ZeRO-2's IPG buckets: ``reduce_bucket_size`` elements each, double-buffered with overlap_comm,
    whatever the trainable size.  They are allocated lazily by ``setup_buckets`` from the first
    trainable parameter's gradient hook and freed by ``_release_ipg_buffers`` at the end of the
    backward, so they are a backward-time allocation, not a static one.  allgather_bucket_size only
    shards the post-step all-gather, which writes in place into the flat bf16 buffer: no allocation."""
    if not zero.get("contiguous_gradients", True):
        return 0
    n_buffers = 2 if zero.get("overlap_comm", False) else 1
    return n_buffers * int(zero.get("reduce_bucket_size", 500_000_000)) * DTYPE_BYTES[inp.dtype]


def _vision_projector_terms(inp: MemoryPlanInput) -> dict[str, int]:
    p, b = inp.preset, DTYPE_BYTES[inp.dtype]
    t, v = p.llm, p.vision
    n_img = inp.micro_batch * inp.images_per_sample
    pos = v.patches + 1
    # The frozen tower runs without autograd (model.freeze_for_stage): nothing is saved but hidden_states[-2],
    # the projector's input.
    vision = n_img * pos * v.hidden * b
    # Projector: linear_1's input is a view of hidden_states[-2] (counted above); GELU input and
    # linear_2 input are 2·h wide.
    return {"act_projector": n_img * v.image_tokens * 2 * t.hidden * b, "act_vision": vision}


def _backward_terms(inp: MemoryPlanInput, zero: dict[str, Any]) -> dict[str, int]:
    p, b = inp.preset, DTYPE_BYTES[inp.dtype]
    t = p.llm
    tokens = inp.micro_batch_tokens
    saved_layer = tokens * layer_saved_bytes_per_token(inp) + _scores_bytes(inp)
    ckpt = inp.checkpointed_layers
    terms: dict[str, int] = {}

    if ckpt:  # only a checkpointed decoder layer's input survives the forward
        terms["act_checkpoints"] = ckpt * tokens * t.hidden * b
    offloaded = inp.offloaded_layers
    if ckpt + offloaded < t.layers:  # the other layers keep everything their backward needs
        terms["act_all_layers" if ckpt == offloaded == 0 else "act_kept_layers"] = \
            (t.layers - ckpt - offloaded) * saved_layer
    if offloaded:  # only the norms' fp32 rstd stays on the device (offload.MIN_BYTES)
        terms["act_offloaded_layers"] = offloaded * tokens * 2 * FP32
    # The attention mask is shared by all layers: eager adds a float 4D mask, SDPA a bool one
    # (padded batches); flash-attention takes the 2-D mask.
    mask_bytes = 0 if inp.packed else {"eager": b, "sdpa": 1, "flash_attention_2": 0}[inp.attn_impl]
    terms["attention_mask"] = inp.micro_batch * inp.seq_len**2 * mask_bytes
    terms.update(_vision_projector_terms(inp))
    if inp.grad_ckpt and inp.stage == "pretrain":
        # enable_input_require_grads turns the frozen embed_tokens output into a leaf requiring
        # grad; its AccumulateGrad node keeps it alive to the end of the backward.  (finetune: the
        # output has EmbeddingBackward as grad_fn, which saves only the indices.)
        terms["act_input_embeds"] = tokens * t.hidden * b
    # Final RMSNorm keeps its fp32 input; finetune also keeps the bf16 cast (saved by the weight
    # multiply for the norm weight's gradient) and the normed output (lm_head's input, for its
    # weight gradient).
    terms["act_final_norm"] = tokens * t.hidden * (FP32 + (2 * b if inp.stage == "finetune" else 0))

    # Layer backward: (recomputed) saved tensors + grads in flight inside the MLP backward
    # (d(act·up), d(act), d(up) or d(gate): 3 i-wide; incoming and residual grads: 2 h-wide).
    # With every layer checkpointed the last layer is replayed at the peak; with only the first k
    # (enable_checkpointing), the replays come after the kept layers' activations are freed.
    layer_ws = (saved_layer if ckpt == t.layers else 0) + tokens * (3 * t.intermediate + 2 * t.hidden) * b
    layer_ws += _scores_bytes(inp)  # eager: grads of the probabilities (fp32 + bf16)
    # Loss, at log_softmax's backward: fp32 log-softmax output (saved) + fp32 grad of that output
    # (nll_loss backward is dense) + fp32 grad of the logits.  The bf16 logits are gone: the
    # training loop keeps only ``.loss`` and ``logits.float()`` (ToCopyBackward) saves nothing.
    loss_ws = 3 * FP32 * tokens * t.vocab
    if inp.loss_impl == "objective":
        # one chunk at a time: recomputed bf16 logits + the same three fp32 tensors, plus the target
        # positions' hidden states gathered out of the sequence and their gradient (bounded by T).
        chunk = min(inp.loss_chunk, tokens)
        loss_ws = (b + 3 * FP32) * chunk * t.vocab + 2 * tokens * t.hidden * b
    if loss_ws >= layer_ws:
        terms["logits_loss"] = loss_ws
    else:
        terms["layer_backward"] = layer_ws

    # Full-size gradient of the largest trainable tensor before it is copied into the bucket. A ZeRO-3 leaf
    # decoder layer (compiled layers, or --ds-config leaf_module) hands its gradients over only after its whole
    # backward: all at once.
    from accelbench.train.ds_config import layers_are_units

    grad_held = _largest_trainable_tensor(p, inp.stage)
    if inp.zero_stage == 3 and inp.stage == "finetune" and layers_are_units(zero):
        grad_held = max(grad_held, t.layer_params)
    terms["largest_param_grad"] = grad_held * b
    if inp.zero_stage == 3:
        terms["params_gathered"] = _gathered_params(inp, zero) * b
    elif inp.stage == "finetune":
        # lm_head's gradient hook fires right after the loss backward: the buckets then live
        # through the whole LLM backward, beside the checkpoints.
        terms["reduce_bucket"] = _zero2_reduce_buckets(inp, zero)
    return terms


def _projector_backward_terms(inp: MemoryPlanInput, zero: dict[str, Any]) -> dict[str, int]:
    """ZeRO-2 pretrain: the first trainable gradient (the projector's) arrives after the LLM
    backward; the LLM activations and the loss tensors are freed, CLIP's and the projector's remain."""
    terms = {"reduce_bucket": _zero2_reduce_buckets(inp, zero), **_vision_projector_terms(inp)}
    if inp.grad_ckpt:
        # masked_scatter's backward has just produced the input-embedding leaf's gradient (T·h)
        # beside the leaf itself (T·h); the projector's gradient follows.
        terms["act_input_embeds"] = 2 * inp.micro_batch_tokens * inp.preset.llm.hidden * DTYPE_BYTES[inp.dtype]
    terms["largest_param_grad"] = _largest_trainable_tensor(inp.preset, inp.stage) * DTYPE_BYTES[inp.dtype]
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
    if inp.kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {inp.kernels!r}")
    if inp.elementwise_recompute and inp.kernels != "inductor":
        raise ValueError(f"elementwise_recompute needs compiled layers (kernels 'inductor'), got {inp.kernels!r}")
    if inp.recompute_layers is not None and not 0 <= inp.recompute_layers <= inp.preset.llm.layers:
        raise ValueError(f"recompute_layers must be 0..{inp.preset.llm.layers}, got {inp.recompute_layers}")
    if inp.offload_layers < 0:
        raise ValueError(f"offload_layers must be >= 0, got {inp.offload_layers}")
    if inp.tokens is not None and inp.tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {inp.tokens}")
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
    if inp.zero_stage == 2 and inp.stage == "pretrain":
        phases["projector_backward"] = _projector_backward_terms(inp, zero)
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


def fit_recompute(inp: MemoryPlanInput, usable_bytes: int) -> tuple[int, MemoryEstimate]:
    """Fewest checkpointed decoder layers whose estimate fits in ``usable_bytes``.

    Recompute buys memory with a replayed forward; a layer that keeps its activations costs
    ``layer_saved_bytes_per_token - hidden·bytes`` per token more than a checkpointed one.  When even
    checkpointing every layer does not fit, returns all layers (the micro-batch is the caller's
    business).
    """
    layers = inp.preset.llm.layers
    for k in range(layers + 1):  # memory falls as k grows: stop at the first fit
        est = estimate_memory(replace(inp, grad_ckpt=True, recompute_layers=k))
        if est.total <= usable_bytes:
            return k, est
    return layers, estimate_memory(replace(inp, grad_ckpt=True, recompute_layers=layers))


def recompute_table(inp: MemoryPlanInput, usable_bytes: int) -> list[tuple[int, int]]:
    """Replayed decoder layers by micro-batch size: ``[(max_tokens, k), ...]``, ``max_tokens`` ascending.

    Each row says: a micro-batch of at most ``max_tokens`` tokens fits with ``k`` layers replayed, and
    ``k`` is the fewest that does for every size above the previous row's.  Packed micro-batches vary
    in size (a 16-sample one holds 9-21k tokens on the synthetic LLaVA-like data), and one at the data's bound
    (``inp.micro_batch_tokens``, the last row) needs more replays than a typical one.  Sizes for which
    even every layer replayed does not fit get no row; the caller replays every layer there.
    """
    bound = inp.micro_batch_tokens
    layers = inp.preset.llm.layers

    def fits(k: int, tokens: int) -> bool:
        return estimate_memory(replace(inp, grad_ckpt=True, recompute_layers=k, tokens=tokens)).total <= usable_bytes

    rows: list[tuple[int, int]] = []
    covered = 0  # micro-batches up to this many tokens already have a row
    for k in range(layers + 1):
        if not fits(k, covered + 1):
            continue
        lo, hi = covered + 1, bound  # the largest size k covers: estimates grow with tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(k, mid) else (lo, mid - 1)
        rows.append((lo, k))
        covered = lo
        if covered >= bound:
            break
    return rows


def offload_table(inp: MemoryPlanInput, usable_bytes: int, replays: list[list[int]]) -> list[list[int]]:
    """Offloaded decoder layers by micro-batch size: ``[[max_tokens, n], ...]``, ``max_tokens`` ascending, like
    ``recompute_table``: a micro-batch of at most ``max_tokens`` tokens (and more than the previous row's) offloads
    ``n`` layers, the fewest up to ``inp.offload_layers`` with which it fits while it replays what ``replays``
    (recompute_table's rows) gives its size. A smaller micro-batch moves less over the host link, or nothing."""
    def fits(k: int, n: int, tokens: int) -> bool:
        trial = replace(inp, grad_ckpt=True, recompute_layers=k, offload_layers=n, tokens=tokens)
        return estimate_memory(trial).total <= usable_bytes

    rows: list[list[int]] = []
    lo = 1
    for hi, k in replays:
        n = 0
        while lo <= hi:
            while n < inp.offload_layers and not fits(k, n, lo):
                n += 1
            top, bottom = hi, lo  # the largest size n covers in [lo, hi]: estimates grow with tokens
            while bottom < top:
                mid = (bottom + top + 1) // 2
                bottom, top = (mid, top) if fits(k, n, mid) or n == inp.offload_layers else (bottom, mid - 1)
            if rows and rows[-1][1] == n:
                rows[-1][0] = bottom  # the same count as the row before: one row
            else:
                rows.append([bottom, n])
            lo = bottom + 1
    return rows


def offloads_for(table: list[list[int]], tokens: int, default: int) -> int:
    """Layers to offload for a micro-batch of ``tokens`` tokens under ``offload_table``'s rows; ``default`` (the
    plan's count) past them or without a table."""
    return _row_for(table, tokens, default)


def replays_for(table: list[tuple[int, int]] | list[list[int]], tokens: int, layers: int) -> int:
    """Layers to replay for a micro-batch of ``tokens`` tokens under ``recompute_table``'s rows; every
    layer past the last row (a micro-batch larger than the data's bound cannot happen, but is safe)."""
    return _row_for(table, tokens, layers)


def _row_for(table: list[tuple[int, int]] | list[list[int]], tokens: int, default: int) -> int:
    """The value of the first ``[max_tokens, value]`` row that holds ``tokens`` tokens; ``default`` past them."""
    for max_tokens, value in table:
        if tokens <= max_tokens:
            return int(value)
    return default
