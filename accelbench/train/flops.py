"""Analytic FLOPs of one LLaVA-1.5 training step (or micro-batch), term by term.

Conventions (stated once, used everywhere):

* A multiply-add is 2 FLOPs; only matmuls/convolutions are counted (norms, softmax, activations,
  rotary, embedding lookups and the loss are O(tokens·hidden) and below 1 % at these shapes) --
  the same thing ``torch.utils.flop_counter.FlopCounterMode`` counts, which the tests check against.
* Attention is counted over the full s×s score matrix, NOT halved for causal masking: forward is
  QKᵀ (2·s²·d per head) + AV (2·s²·d per head) = 4·s²·hidden per layer per sequence.  This is
  PaLM's convention: its 12·L·H·Q·T per token is 3 × this forward term (forward + 2 × backward).
* Backward of a matmul is 2 × its forward when both the weight gradient and the input (activation)
  gradient are needed, 1 × when only one of them is.  A frozen module that gradients must flow
  *through* still costs the activation-gradient half.
* ``model_flops`` (MFU basis, PaLM): real sequence lengths, no recompute.
  ``hardware_flops`` (HFU basis): what the hardware executed -- padded lengths when ``padded_len``
  is given, plus the replayed layer forwards under gradient checkpointing, plus, for a model that pushes
  activation gradients through the frozen CLIP tower (transformers' Llava when checkpointing is enabled; not
  accelbench's, see ``model.freeze_for_stage``), that backward (``_vision_grad_path``).  Both were checked
  op-for-op against FlopCounterMode.

Vision tower: transformers 5.24's Llava asks CLIP for ``output_hidden_states=-2`` but
``CLIPEncoder`` still loops over *all* layers (verified with FlopCounterMode on the tiny preset,
see tests/test_flops.py), so the forward counts ``vision.layers`` layers, not ``vision.layers_run``.
Only the ``layers_run`` layers can receive gradients (hardware-only, see ``_vision_grad_path``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from accelbench.cases import ModelPreset

Stage = Literal["pretrain", "finetune"]
STAGES: tuple[str, ...] = ("pretrain", "finetune")


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per term at real lengths (MFU basis) and the two totals."""

    vision_fwd: int  # frozen CLIP tower, forward only (patch conv + all encoder layers)
    projector: int  # 2-layer MLP, forward + backward (trained in both stages)
    llm_dense: int  # decoder-layer matmuls, forward + backward
    llm_attention: int  # QKᵀ and AV, forward + backward, full s² (not halved for causal)
    lm_head: int  # vocab projection over every position, forward + backward
    model_flops: int  # sum of the terms above: MFU numerator
    hardware_flops: int  # padded lengths + gradient-checkpointing recompute: HFU numerator
    recompute_flops: int  # part of hardware_flops spent replaying checkpointed layers (LLM + CLIP)
    padding_flops: int  # part of hardware_flops spent on pad positions (excl. their recompute)
    frozen_vision_bwd_flops: int  # part of hardware_flops: activation grads through frozen CLIP

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Matmul weight counts (biases and norm weights do no matmul work)
# ---------------------------------------------------------------------------------------------

def vision_layers_executed(preset: ModelPreset) -> int:
    """CLIP encoder layers that actually run: all of them (see module docstring)."""
    return preset.vision.layers


def _vision_layer_matmul_params(preset: ModelPreset) -> int:
    h, i = preset.vision.hidden, preset.vision.intermediate
    return 4 * h * h + 2 * h * i  # q, k, v, out + fc1, fc2


def _projector_matmul_params(preset: ModelPreset) -> tuple[int, int]:
    v, h = preset.vision.hidden, preset.llm.hidden
    return v * h, h * h  # linear_1, linear_2


def llm_layer_matmul_params(preset: ModelPreset) -> int:
    """Matmul weights of one Llama decoder layer (q, k, v, o, gate, up, down)."""
    t = preset.llm
    kv = t.kv_heads * t.head_dim
    return 2 * t.hidden * t.hidden + 2 * t.hidden * kv + 3 * t.hidden * t.intermediate


# ---------------------------------------------------------------------------------------------
# Per-term FLOPs
# ---------------------------------------------------------------------------------------------

def _vision_fwd(preset: ModelPreset, n_images: int) -> int:
    v = preset.vision
    positions = v.patches + 1  # CLS is computed with, then dropped after the tower
    conv = 2 * (3 * v.patch_size**2) * v.hidden * v.patches
    per_layer = 2 * _vision_layer_matmul_params(preset) * positions + 4 * positions**2 * v.hidden
    return n_images * (conv + vision_layers_executed(preset) * per_layer)


def _projector(preset: ModelPreset, n_images: int) -> int:
    p1, p2 = _projector_matmul_params(preset)
    tokens = n_images * preset.vision.image_tokens
    fwd = 2 * (p1 + p2) * tokens
    wgrad = 2 * (p1 + p2) * tokens
    # Input gradient only for linear_2: linear_1's input comes from the frozen vision tower and
    # does not require grad, so autograd skips that matmul.  (So 4·P1 + 6·P2 per token, not 6·P.)
    dgrad = 2 * p2 * tokens
    return fwd + wgrad + dgrad


def _backward_factor(stage: str) -> int:
    """Backward cost as a multiple of forward for weights the stage trains or freezes.

    finetune: the LLM is trained -> weight + activation gradients (2×).
    pretrain: the LLM is frozen, but the loss gradient must still flow through every layer back to
    the projector -> activation gradients only (1×).
    """
    return 2 if stage == "finetune" else 1


def _llm_dense_fwd(preset: ModelPreset, tokens: int) -> int:
    return 2 * preset.llm.layers * llm_layer_matmul_params(preset) * tokens


def _llm_attention_fwd(preset: ModelPreset, seq_lens: Sequence[int]) -> int:
    t = preset.llm
    q_width = t.heads * t.head_dim  # == hidden for Llama; keys/values share it under GQA
    return sum(4 * s * s * q_width * t.layers for s in seq_lens)


def _lm_head_fwd(preset: ModelPreset, tokens: int) -> int:
    # HF computes logits at every position (logits_to_keep=0), image and pad positions included.
    return 2 * preset.llm.vocab * preset.llm.hidden * tokens


def _terms(preset: ModelPreset, seq_lens: Sequence[int], n_images: int, stage: str,
           lm_head_tokens: int | None = None) -> dict[str, int]:
    tokens = sum(seq_lens)
    head_tokens = tokens if lm_head_tokens is None else lm_head_tokens
    k = _backward_factor(stage)
    return {
        "vision_fwd": _vision_fwd(preset, n_images),
        "projector": _projector(preset, n_images),
        "llm_dense": (1 + k) * _llm_dense_fwd(preset, tokens),
        # Attention has no weights: its backward needs dQ, dK, dV (two matmuls per forward matmul)
        # in both stages, because the gradient flows through it either way.
        "llm_attention": 3 * _llm_attention_fwd(preset, seq_lens),
        "lm_head": (1 + k) * _lm_head_fwd(preset, head_tokens),
    }


def _llm_recompute(preset: ModelPreset, seq_lens: Sequence[int], early_stop: bool, layers: int) -> int:
    """Gradient checkpointing re-runs each checkpointed decoder layer's forward before its backward.

    torch's non-reentrant checkpoint (transformers' default, ``use_reentrant=False``) stops the
    replay as soon as every tensor saved for backward is regenerated: the layer's last matmul
    (``down_proj``) produces nothing the backward needs, so it is not re-run.  lm_head, projector and
    embeddings are not checkpointed.
    """
    t = preset.llm
    full = _llm_dense_fwd(preset, sum(seq_lens)) + _llm_attention_fwd(preset, seq_lens)
    skipped = 2 * t.layers * t.hidden * t.intermediate * sum(seq_lens) if early_stop else 0
    return (full - skipped) * layers // t.layers


def _vision_grad_path(preset: ModelPreset, n_images: int, grad_ckpt: bool, early_stop: bool) -> tuple[int, int]:
    """(backward, recompute) FLOPs spent in the *frozen* CLIP tower when gradients reach it.

    transformers 5.24's ``activation_checkpointing_enable`` calls ``enable_input_require_grads``, which
    hooks the input embeddings of every sub-model -- including CLIP's patch embedding -- so the patch
    embeddings require grad and autograd back-propagates activation gradients (no weight gradients:
    frozen) through the tower, and, its layers being checkpointed, replays them.  Only the
    ``layers_run`` layers that feed ``hidden_states[-2]`` see a gradient; the last layer's output is
    unused.  The gradient also makes the projector's ``linear_1`` compute its input gradient.
    None of this is needed for the model's math, so it counts towards hardware FLOPs only.
    """
    v = preset.vision
    positions = v.patches + 1
    layers = v.layers_run
    attn_fwd = 4 * positions**2 * v.hidden
    dense = _vision_layer_matmul_params(preset)
    backward = layers * (2 * dense * positions + 2 * attn_fwd)
    backward += 2 * _projector_matmul_params(preset)[0] * v.image_tokens  # linear_1 input gradient
    recompute = 0
    if grad_ckpt:
        replayed = dense - v.hidden * v.intermediate if early_stop else dense  # fc2 not replayed
        recompute = layers * (2 * replayed * positions + attn_fwd)
    return n_images * backward, n_images * recompute


def step_flops(
    preset: ModelPreset,
    seq_lens: Sequence[int],
    n_images: int,
    stage: Stage,
    *,
    grad_ckpt: bool,
    padded_len: int | None = None,
    frozen_vision_backward: bool = False,
    recompute_early_stop: bool = True,
    lm_head_tokens: int | None = None,
    recompute_layers: int | None = None,
) -> FlopBreakdown:
    """FLOPs of forward + backward over the given sequences.

    ``seq_lens``: per-sequence token counts *including* the image tokens (576 per image for
    LLaVA-1.5), excluding padding.  ``n_images``: images encoded for these sequences.
    ``padded_len``: when the batch is padded to a common length, the hardware processes that
    length for every sequence (only affects ``hardware_flops``).
    ``frozen_vision_backward``: whether gradients flow into the frozen CLIP tower (see
    ``_vision_grad_path``): not in accelbench's model, whose tower runs without autograd as LLaVA's does
    (``model.freeze_for_stage``); transformers' own Llava under activation checkpointing does it.
    ``recompute_early_stop``: torch's non-reentrant checkpoint early stop (default on); pass False
    for reentrant checkpointing, which replays the whole layer.
    ``lm_head_tokens``: positions whose logits are computed, when the objective computes them only
    at target positions (accelbench's ``objective.selected_cross_entropy``, which also recomputes
    them once in backward); None means every position, as transformers' own loss does.
    ``recompute_layers``: decoder layers replayed under ``grad_ckpt`` (None: all of them).
    Pass one micro-batch for per-micro-batch FLOPs, or all sequences of a step for per-step.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    lens = [int(s) for s in seq_lens]
    if any(s < 1 for s in lens):
        raise ValueError(f"sequence lengths must be >= 1, got {lens}")
    if n_images < 0 or n_images * preset.vision.image_tokens > sum(lens):
        raise ValueError(
            f"{n_images} images need {n_images * preset.vision.image_tokens} image tokens, "
            f"but the sequences hold only {sum(lens)} tokens"
        )
    if padded_len is not None and lens and padded_len < max(lens):
        raise ValueError(f"padded_len {padded_len} is shorter than the longest sequence {max(lens)}")
    terms = _terms(preset, lens, n_images, stage, lm_head_tokens)
    model = sum(terms.values())

    hw_lens = [padded_len] * len(lens) if padded_len is not None else lens
    hw_terms = sum(_terms(preset, hw_lens, n_images, stage, lm_head_tokens).values())
    replayed = preset.llm.layers if recompute_layers is None else recompute_layers
    recompute = _llm_recompute(preset, hw_lens, recompute_early_stop, replayed) if grad_ckpt else 0
    if lm_head_tokens is not None:
        recompute += _lm_head_fwd(preset, lm_head_tokens)  # chunked logits are recomputed in backward
    vision_bwd = vision_recompute = 0
    if frozen_vision_backward:
        vision_bwd, vision_recompute = _vision_grad_path(preset, n_images, grad_ckpt, recompute_early_stop)
    recompute += vision_recompute
    return FlopBreakdown(
        **terms,
        model_flops=model,
        hardware_flops=hw_terms + recompute + vision_bwd,
        recompute_flops=recompute,
        padding_flops=hw_terms - model,
        frozen_vision_bwd_flops=vision_bwd,
    )


# ---------------------------------------------------------------------------------------------
# Utilisation
# ---------------------------------------------------------------------------------------------

def flagperf_mfu(params: float, stage: str, tokens_per_sec: float, peak_flops: float) -> float:
    """FlagPerf's LLaVA MFU: k·N·tokens/s / peak, k = 2 (pretrain) or 6 (finetune).

    Kept for comparison with published FlagPerf numbers; it ignores attention and the vision tower
    and undercounts pretrain (the frozen LLM still runs a backward for activation gradients).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    k = 2 if stage == "pretrain" else 6
    return k * params * tokens_per_sec / peak_flops


def mfu(flops_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOPs/s over the device's peak (same dtype)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return flops_per_sec / peak_flops
