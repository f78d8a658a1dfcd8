"""Memory model: every term checked against a hand computation on the tiny preset."""
from __future__ import annotations

from dataclasses import replace

import pytest

from accelbench.cases import PRESETS
from accelbench.memory import (
    GiB,
    MemoryPlanInput,
    estimate_memory,
    fit_micro_batch,
    parameter_tensors,
    tower_threshold,
    trainable_params,
)
from accelbench.train.ds_config import deepspeed_config

TINY = PRESETS["tiny"]
# tiny: vision h=32 i=64 L=3, 56/14 -> 16 patches (17 positions); LLM h=64 i=172 L=2 heads=4 kv=4 V=1024.
TOTAL = 281_632
PROJECTOR = 32 * 64 + 64 + 64 * 64 + 64  # 6272
LLM_LAYER = 4 * 64 * 64 + 3 * 64 * 172 + 2 * 64  # 49536 (q,k,v,o + gate,up,down + 2 norms)
LLM = 2 * LLM_LAYER + 2 * 1024 * 64 + 64  # 230208 (layers + embed + lm_head + final norm)


def _ds(zero_stage: int, **overrides):
    return deepspeed_config(zero_stage=zero_stage, micro_batch=1, grad_accum=1, world_size=2, dtype="bf16",
                            hidden_size=64, overrides=overrides or None)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_inventory_matches_presets(name):
    preset = PRESETS[name]
    assert sum(n for _, n in parameter_tensors(preset)) == preset.params


def test_trainable_params():
    assert trainable_params(TINY, "pretrain") == PROJECTOR
    assert trainable_params(TINY, "finetune") == PROJECTOR + LLM
    assert TINY.params == TOTAL


def test_finetune_zero3_terms_by_hand():
    inp = MemoryPlanInput(TINY, "finetune", zero_stage=3, dp_size=4, micro_batch=2, seq_len=40,
                          ds_config=_ds(3), fragmentation=0.1, framework_bytes=1000)
    est = estimate_memory(inp)
    t = est.terms
    # ZeRO-3 "auto" values for hidden 64: reduce bucket 4096, prefetch int(0.9·4096)=3686,
    # persistence threshold 640.  Tensors <= 640 elements stay whole on every rank:
    persistent_vision = 32 + 2 * 32 + 3 * (4 * 32 + 2 * 32 + 64 + 32 + 2 * 32) + 2 * 32 + 17 * 32
    # (class emb, pre-LN, per layer: 4 attn biases, LN1, fc1 bias, fc2 bias, LN2; post-LN, pos. emb 17×32)
    persistent = persistent_vision + 2 * 64 + (2 * 2 * 64 + 64)  # + projector biases + Llama norms
    assert persistent == 2208
    assert t["params_persistent"] == persistent * 2
    assert t["params_partition"] == -(-TOTAL // 4) * 2  # a persistent tensor keeps its partition too
    part = -(-(PROJECTOR + LLM) // 4)  # trainable partition: 59120
    assert part == 59120
    assert t["grads_partition"] == part * 2
    assert t["reduce_bucket"] == 64 * 64 * 2
    assert t["master_params_fp32"] == part * 4
    assert t["adam_moments_fp32"] == part * 8

    tokens = 2 * 40
    assert t["act_checkpoints"] == 2 * tokens * 64 * 2  # L · mbs · seq · h · 2 bytes
    assert est.allocated == est.total - t["fragmentation"] - t["framework"]
    assert t["attention_mask"] == 0  # flash attention takes the 2-D mask
    assert t["act_projector"] == 2 * 16 * (2 * 64) * 2  # GELU and linear_2 inputs (linear_1's is CLIP's)
    # the frozen tower runs without autograd: only hidden_states[-2] (17 positions), the projector's input
    assert t["act_vision"] == 2 * 32 * 2 * 17
    assert "act_input_embeds" not in t  # finetune: embed_tokens trains, its output is no leaf
    assert t["act_final_norm"] == tokens * 64 * (4 + 2 + 2)  # fp32 input, bf16 cast, bf16 normed
    # Loss: fp32 log-softmax + fp32 d(log-softmax) + fp32 d(logits) = 12 B/elt (bf16 logits freed).
    loss = tokens * 1024 * (4 + 4 + 4)
    saved_per_token = 2 * (4 * 64 + 2 * 2 * 64) + 4 * 64 * 2 + 4 * 172 * 2 + 4 * 4  # norms, qkvo, mlp, lse
    layer_ws = tokens * saved_per_token + tokens * (3 * 172 + 2 * 64) * 2
    assert loss > layer_ws
    assert t["logits_loss"] == loss and "layer_backward" not in t
    assert t["largest_param_grad"] == 1024 * 64 * 2  # embed_tokens / lm_head
    # Gathered: lm_head + both layers (reuse distance 2·1·49536 + 2·65536 < 1e9) + prefetch bucket.
    assert t["params_gathered"] == (1024 * 64 + 2 * LLM_LAYER + 3686) * 2

    backward = sum(est.phase_terms["backward"].values())
    assert est.phase_terms["optimizer_step"] == {"step_fp32_grad": part * 4, "step_adam_temp": part * 4}
    assert est.peak_phase == "backward"
    assert t["fragmentation"] == int(0.1 * backward)
    assert t["framework"] == 1000
    assert est.total == sum(t.values())
    static = sum(t[k] for k in ("params_partition", "params_persistent", "grads_partition", "reduce_bucket",
                                "master_params_fp32", "adam_moments_fp32"))
    assert est.total == static + backward + int(0.1 * backward) + 1000


def test_pretrain_zero2_eager_no_ckpt_terms_by_hand():
    inp = MemoryPlanInput(TINY, "pretrain", zero_stage=2, dp_size=2, micro_batch=1, seq_len=32,
                          grad_ckpt=False, attn_impl="eager", ds_config=_ds(2), fragmentation=0.0,
                          framework_bytes=0)
    est = estimate_memory(inp)
    t = est.terms
    part = PROJECTOR // 2  # 3136
    assert t["params_full"] == TOTAL * 2
    assert t["grads_partition"] == part * 2
    assert t["master_params_fp32"] == part * 4 and t["adam_moments_fp32"] == part * 8

    bw = est.phase_terms["backward"]
    assert "reduce_bucket" not in bw  # ZeRO-2 allocates its buckets at the projector's gradient
    # Frozen LLM: norms keep only their fp32 input, linears keep no inputs, MLP keeps gate/act/up.
    saved_per_token = 2 * 4 * 64 + 4 * 64 * 2 + 3 * 172 * 2  # no logsumexp with eager
    scores = 1 * 4 * 32 * 32 * (4 + 2)  # fp32 softmax + bf16 probabilities
    assert bw["act_all_layers"] == 2 * (32 * saved_per_token + scores)
    assert bw["attention_mask"] == 32 * 32 * 2  # eager: additive bf16 4-D mask
    assert bw["act_projector"] == 16 * 128 * 2
    assert bw["act_vision"] == 17 * 32 * 2  # only hidden_states[-2] survives (no grad into CLIP)
    assert "act_input_embeds" not in bw  # no checkpointing: no input-require-grads hook
    assert bw["act_final_norm"] == 32 * 64 * 4
    assert bw["logits_loss"] == 32 * 1024 * 12
    assert bw["largest_param_grad"] == 64 * 64 * 2  # projector linear_2 weight
    assert "params_gathered" not in bw
    assert est.phase_terms["projector_backward"] == {
        "reduce_bucket": 2 * 500_000_000 * 2,  # overlap_comm double buffer, bf16
        "act_projector": 16 * 128 * 2, "act_vision": 17 * 32 * 2, "largest_param_grad": 64 * 64 * 2}
    assert est.peak_phase == "projector_backward"  # tiny model: the 2 GB buckets dominate
    assert t["reduce_bucket"] == 2 * 500_000_000 * 2 and "logits_loss" not in t
    assert t["fragmentation"] == 0 and t["framework"] == 0
    assert est.total == est.allocated == sum(t.values())


def test_pretrain_zero2_ckpt_terms_by_hand():
    inp = MemoryPlanInput(PRESETS["llava1.5-7b"], "pretrain", zero_stage=2, dp_size=2, micro_batch=4, seq_len=2048,
                          attn_impl="sdpa", fragmentation=0.0, framework_bytes=0)
    est = estimate_memory(inp)
    t, tokens = est.terms, 4 * 2048
    assert est.peak_phase == "backward" and "reduce_bucket" not in t
    assert t["act_checkpoints"] == 32 * tokens * 4096 * 2
    assert t["act_input_embeds"] == tokens * 4096 * 2  # frozen embed_tokens output made a leaf
    assert t["act_final_norm"] == tokens * 4096 * 4  # frozen norm weight and lm_head: fp32 input only
    assert t["act_vision"] == 4 * 1024 * 2 * 577  # hidden_states[-2] only: the tower runs without autograd
    assert t["logits_loss"] == tokens * 32000 * 12
    proj = est.phase_terms["projector_backward"]
    assert proj["reduce_bucket"] == 2 * 500_000_000 * 2
    assert proj["act_input_embeds"] == 2 * tokens * 4096 * 2  # leaf + its gradient


def test_layer_backward_wins_with_small_vocab():
    small_vocab = TINY.with_vocab(8)
    inp = MemoryPlanInput(small_vocab, "finetune", 3, 2, 2, 40, ds_config=_ds(3), framework_bytes=0)
    t = estimate_memory(inp).terms
    tokens = 80
    saved_per_token = 2 * (4 * 64 + 2 * 2 * 64) + 4 * 64 * 2 + 4 * 172 * 2 + 4 * 4
    assert "logits_loss" not in t
    assert t["layer_backward"] == tokens * saved_per_token + tokens * (3 * 172 + 2 * 64) * 2


def test_reads_bucket_sizes_from_ds_config():
    base = MemoryPlanInput(TINY, "finetune", 3, 2, 1, 32, ds_config=_ds(3))
    bigger = replace(base, ds_config=_ds(3, zero_optimization={"reduce_bucket_size": 10_000,
                                                               "stage3_prefetch_bucket_size": 5_000}))
    a, b = (estimate_memory(x).phase_terms["backward"] for x in (base, bigger))
    assert estimate_memory(bigger).terms["reduce_bucket"] == 20_000  # ZeRO-3: static, allocated at init
    assert b["params_gathered"] - a["params_gathered"] == (5_000 - 3686) * 2
    capped = replace(base, ds_config=_ds(3, zero_optimization={"stage3_max_live_parameters": 1}))
    assert estimate_memory(capped).phase_terms["backward"]["params_gathered"] == (1024 * 64 + 2 * LLM_LAYER) * 2  # no prefetch
    no_overlap = MemoryPlanInput(TINY, "finetune", 2, 2, 1, 32, ds_config=_ds(2, zero_optimization={
        "overlap_comm": False}))
    assert estimate_memory(no_overlap).phase_terms["backward"]["reduce_bucket"] == 500_000_000 * 2
    with pytest.raises(ValueError):
        estimate_memory(replace(base, zero_stage=2))  # ds_config says stage 3


@pytest.mark.parametrize("name", list(PRESETS))
def test_whole_tower_threshold_keeps_the_encoder_layers_and_no_decoder_weight(name):
    preset = PRESETS[name]
    v, t = preset.vision, preset.llm
    threshold = tower_threshold(preset)
    assert threshold >= max(v.hidden * v.intermediate, v.hidden * v.hidden, 10 * t.hidden)
    assert threshold < min(t.hidden * t.kv_heads * t.head_dim, t.hidden * t.hidden)
    if name.startswith("llava1.5"):  # CLIP ViT-L/14-336: the whole tower, embeddings included
        assert all(n <= threshold for c, n in parameter_tensors(preset) if c == "vision")
    # the estimate: the tower's tensors become whole copies beside their partitions
    ds = deepspeed_config(zero_stage=3, micro_batch=1, grad_accum=1, world_size=2, dtype="bf16", hidden_size=t.hidden)
    base = MemoryPlanInput(preset, "finetune", 3, 2, 1, 32, ds_config=ds)
    whole = replace(base, ds_config=deepspeed_config(
        zero_stage=3, micro_batch=1, grad_accum=1, world_size=2, dtype="bf16", hidden_size=t.hidden,
        overrides={"zero_optimization": {"stage3_param_persistence_threshold": threshold}}))
    a, b = estimate_memory(base).terms, estimate_memory(whole).terms
    newly = sum(n for _, n in parameter_tensors(preset) if 10 * t.hidden < n <= threshold)
    assert b["params_persistent"] - a["params_persistent"] == newly * 2 > 0
    assert b["params_partition"] == a["params_partition"]


def test_default_ds_config_and_step_phase_peak():
    # Huge dp-1 optimizer partition, tiny activations: the optimizer step is the peak.
    inp = MemoryPlanInput(PRESETS["llava1.5-7b"], "finetune", 3, 1, 1, 600)
    est = estimate_memory(inp)
    assert est.peak_phase == "optimizer_step"
    assert est.terms["step_fp32_grad"] == 1_000_000_000 * 4  # one sub_group_size sub-group
    assert est.total == sum(est.terms.values())


def test_monotone_and_sensible_orderings():
    p = PRESETS["llava1.5-13b"]
    base = MemoryPlanInput(p, "finetune", 3, 16, 4, 2048)
    totals = [estimate_memory(replace(base, micro_batch=m)).total for m in range(1, 9)]
    assert totals == sorted(totals)  # non-decreasing: at mbs 1-2 the optimizer step is the peak
    assert len(set(totals[2:])) == len(totals[2:])  # strictly growing once the backward is
    assert estimate_memory(replace(base, grad_ckpt=False)).total > estimate_memory(base).total
    assert estimate_memory(replace(base, attn_impl="eager")).total > estimate_memory(base).total
    assert estimate_memory(replace(base, dp_size=32)).total < estimate_memory(base).total
    pre = replace(base, stage="pretrain")
    assert estimate_memory(pre).total < estimate_memory(base).total


def test_fit_micro_batch():
    inp = MemoryPlanInput(PRESETS["llava1.5-13b"], "finetune", 3, 16, 1, 2048)
    usable = int(0.9 * 32 * GiB)
    mbs, est = fit_micro_batch(inp, usable)
    assert mbs >= 1 and est.total <= usable
    assert estimate_memory(replace(inp, micro_batch=mbs + 1)).total > usable
    assert fit_micro_batch(inp, usable, max_mbs=2)[0] == min(2, mbs)
    none, est1 = fit_micro_batch(inp, 1 * GiB)
    assert none == 0 and est1.total > GiB


def test_to_dict_units_and_validation():
    est = estimate_memory(MemoryPlanInput(TINY, "finetune", 2, 1, 1, 32, framework_bytes=0))
    d = est.to_dict("MiB")
    assert d["unit"] == "MiB"
    assert d["total"] == pytest.approx(est.total / 1024**2)
    assert d["terms"]["params_full"] == pytest.approx(TOTAL * 2 / 1024**2)
    assert est.to_dict()["unit"] == "GiB"
    for bad in ({"stage": "sft"}, {"zero_stage": 1}, {"dtype": "int8"}, {"attn_impl": "xformers"},
                {"micro_batch": 0}, {"fragmentation": -0.1}):
        with pytest.raises(ValueError):
            estimate_memory(replace(MemoryPlanInput(TINY, "finetune", 2, 1, 1, 32), **bad))


def test_fp32_has_no_master_copy():
    est = estimate_memory(MemoryPlanInput(TINY, "finetune", 2, 1, 1, 32, dtype="fp32"))
    assert est.terms["master_params_fp32"] == 0
    assert est.terms["params_full"] == TOTAL * 4


# 2026-11-28, 2x H200, torch 2.11+cu130, transformers 5.24, deepspeed 0.19.8, sdpa, bf16, grad ckpt,
# seq 2048: torch.cuda.max_memory_allocated() from benchmarks/gpu/memory_check.py
# (docs/measurements/h200-x2-2026-11-28/memory_check.jsonl).
H200_MEASURED = [("pretrain", 2, 16, 34.405789852142334), ("pretrain", 2, 32, 55.47314977645874),
                 ("finetune", 3, 8, 63.265955448150635), ("finetune", 3, 16, 73.92526865005493)]


@pytest.mark.parametrize("stage,zero,mbs,measured_gib", H200_MEASURED)
def test_h200_llava7b_measurements(stage, zero, mbs, measured_gib):
    est = estimate_memory(MemoryPlanInput(PRESETS["llava1.5-7b"], stage, zero, 2, mbs, 2048, attn_impl="sdpa"))
    assert abs(est.total / GiB / measured_gib - 1) < 0.15  # the acceptance bar
    assert abs(est.allocated / GiB / measured_gib - 1) < 0.03  # the allocator's own counter
