"""Selective recompute, fused-kernel memory, the data's micro-batch token bound and the `--without` levers.

Memory and FLOPs values are computed by hand from the documented formulas; the planner is exercised on
described machines (no GPU needed); the model part runs the tiny LLaVA on CPU in fp32.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from accelbench.backends import load_registry
from accelbench.cases import PRESETS
from accelbench.errors import ConfigError
from accelbench.machine import describe_machine
from accelbench.memory import (
    GiB,
    MemoryPlanInput,
    estimate_memory,
    fit_recompute as fit_recompute_memory,
    layer_saved_bytes_per_token,
    offloads_for,
    recompute_table,
    replays_for,
)
from accelbench.plan import (FIXED_REPLAYS_NOTE, LEVERS, build_plan, estimate, fit_recompute, memory_input,
                             parse_recompute)
from accelbench.train.datacheck import micro_batch_token_bound
from accelbench.train.flops import llm_layer_matmul_params, step_flops

TINY = PRESETS["tiny"]
P7 = PRESETS["llava1.5-7b"]  # h 4096, i 11008, 32 layers, 32 heads, kv 32·128 = 4096
P13 = PRESETS["llava1.5-13b"]  # h 5120, i 13824, 40 layers, 40 heads


# =============================================================================================
# memory model
# =============================================================================================

def _inp7(stage: str = "pretrain", **kw) -> MemoryPlanInput:
    base = dict(preset=P7, stage=stage, zero_stage=2 if stage == "pretrain" else 3, dp_size=2, micro_batch=4,
                seq_len=2048, attn_impl="sdpa", fragmentation=0.0, framework_bytes=0)
    return MemoryPlanInput(**{**base, **kw})


# h=4096, i=11008, kv=4096, heads=32, bf16 (2 bytes), fp32 (4 bytes); with sdpa an fp32 logsumexp of 32 heads.
_ATTN7 = (4096 + 4096 + 4096 + 4096) * 2  # q, k, v, attention output: 32768
_LSE7 = 4 * 32  # 128
SAVED_7B = {
    # hf finetune: 2 norms × (fp32 in 4h + bf16 cast 2h + bf16 normed 2h), attention, MLP gate/act/up/act·up (4i)
    ("hf", "finetune"): 2 * (4 * 4096 + 2 * 4096 + 2 * 4096) + _ATTN7 + 4 * 11008 * 2 + _LSE7,
    # hf pretrain: norms keep their fp32 input only, MLP gate/act/up (3i)
    ("hf", "pretrain"): 2 * 4 * 4096 + _ATTN7 + 3 * 11008 * 2 + _LSE7,
    # liger finetune: norm keeps bf16 input + fp32 rstd + bf16 normed; SwiGLU keeps gate, up, act·up
    ("liger", "finetune"): 2 * (2 * 4096 + 4 + 2 * 4096) + _ATTN7 + 3 * 11008 * 2 + _LSE7,
    # liger pretrain: norm keeps bf16 input + fp32 rstd; SwiGLU keeps gate and up
    ("liger", "pretrain"): 2 * (2 * 4096 + 4) + _ATTN7 + 2 * 11008 * 2 + _LSE7,
}


def test_saved_bytes_per_token_hand_values():
    assert SAVED_7B == {("hf", "finetune"): 186496, ("hf", "pretrain"): 131712,
                        ("liger", "finetune"): 131720, ("liger", "pretrain"): 93320}
    for (kernels, stage), expected in SAVED_7B.items():
        assert layer_saved_bytes_per_token(_inp7(stage, kernels=kernels)) == expected, (kernels, stage)
    # eager attention keeps no logsumexp
    assert layer_saved_bytes_per_token(_inp7("pretrain", kernels="liger", attn_impl="eager")) == \
        SAVED_7B[("liger", "pretrain")] - _LSE7


def test_saved_bytes_per_token_elementwise_recompute():
    # compiled layers recomputing element-wise results keep each norm's bf16 input and fp32 rstd, q, k, v, gate
    # and up, in either stage: 2·(2h + 4) + 3·2h + 2·2i
    for stage in ("finetune", "pretrain"):
        inp = _inp7(stage, kernels="inductor", elementwise_recompute=True)
        assert layer_saved_bytes_per_token(inp) == 2 * (2 * 4096 + 4) + 3 * 4096 * 2 + 2 * 11008 * 2 == 85000
    # Inductor's default partitioner is counted as Liger
    assert layer_saved_bytes_per_token(_inp7("finetune", kernels="inductor")) == SAVED_7B[("liger", "finetune")]
    with pytest.raises(ValueError, match="elementwise_recompute needs compiled layers"):
        estimate_memory(_inp7("finetune", kernels="liger", elementwise_recompute=True))


def test_saved_bytes_per_token_tiny_liger():
    # tiny: h 64, i 172, kv 4·16 = 64, heads 4
    inp = MemoryPlanInput(TINY, "finetune", 3, 2, 2, 40, kernels="liger")
    assert layer_saved_bytes_per_token(inp) == 2 * (2 * 64 + 4 + 2 * 64) + 4 * 64 * 2 + 3 * 172 * 2 + 4 * 4  # 2080
    assert layer_saved_bytes_per_token(replace(inp, stage="pretrain")) == 2 * (2 * 64 + 4) + 4 * 64 * 2 + 2 * 172 * 2 + 16


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("kernels", ["hf", "liger"])
def test_all_layers_equals_the_default(stage, kernels):
    default = estimate_memory(_inp7(stage, kernels=kernels))
    explicit = estimate_memory(_inp7(stage, kernels=kernels, recompute_layers=32))
    assert explicit == default  # terms, total, peak phase, every phase
    assert default.phase_terms["backward"]["act_checkpoints"] == 32 * 4 * 2048 * 4096 * 2
    assert "act_kept_layers" not in default.phase_terms["backward"]
    assert "act_all_layers" not in default.phase_terms["backward"]


@pytest.mark.parametrize("stage,kernels,k", [("pretrain", "liger", 5), ("pretrain", "hf", 31),
                                              ("finetune", "hf", 1), ("finetune", "liger", 20)])
def test_partial_recompute_terms_by_hand(stage, kernels, k):
    tokens = 4 * 2048
    bw = estimate_memory(_inp7(stage, kernels=kernels, recompute_layers=k)).phase_terms["backward"]
    assert bw["act_checkpoints"] == k * tokens * 4096 * 2
    assert bw["act_kept_layers"] == (32 - k) * tokens * SAVED_7B[(kernels, stage)]
    assert "act_all_layers" not in bw


def test_no_checkpointing_keeps_every_layer():
    tokens = 4 * 2048
    off = estimate_memory(_inp7("pretrain", grad_ckpt=False)).phase_terms["backward"]
    zero = estimate_memory(_inp7("pretrain", recompute_layers=0)).phase_terms["backward"]
    assert off["act_all_layers"] == zero["act_all_layers"] == 32 * tokens * SAVED_7B[("hf", "pretrain")]
    assert "act_checkpoints" not in off and "act_checkpoints" not in zero
    assert "act_kept_layers" not in zero
    # grad_ckpt=False ignores recompute_layers altogether
    assert _inp7("pretrain", grad_ckpt=False, recompute_layers=7).checkpointed_layers == 0
    assert estimate_memory(_inp7("pretrain", grad_ckpt=False, recompute_layers=7)) == \
        estimate_memory(_inp7("pretrain", grad_ckpt=False))
    # recompute_layers=0 still hooks the input embeddings (enable_checkpointing does whatever llm_layers is), so
    # only that term differs from grad_ckpt=False; the frozen tower keeps its output alone either way.
    assert zero["act_vision"] == off["act_vision"] == 4 * 577 * 1024 * 2
    assert zero["act_input_embeds"] == tokens * 4096 * 2 and "act_input_embeds" not in off
    assert {k: v for k, v in zero.items() if k != "act_input_embeds"} == off


def test_properties():
    inp = _inp7()
    assert inp.micro_batch_tokens == 4 * 2048 and inp.checkpointed_layers == 32
    assert replace(inp, tokens=777).micro_batch_tokens == 777
    assert replace(inp, recompute_layers=3).checkpointed_layers == 3


def test_tokens_override_micro_batch_times_seq():
    t = 5000  # a packed micro-batch shorter than LBS × MPE = 8192
    inp = _inp7("pretrain", tokens=t, recompute_layers=10)
    bw = estimate_memory(inp).phase_terms["backward"]
    assert bw["act_checkpoints"] == 10 * t * 4096 * 2
    assert bw["act_kept_layers"] == 22 * t * SAVED_7B[("hf", "pretrain")]
    assert bw["act_input_embeds"] == t * 4096 * 2
    assert bw["act_final_norm"] == t * 4096 * 4
    assert bw["attention_mask"] == 4 * 2048**2 * 1  # padded sdpa mask still spans micro_batch × seq²
    assert estimate_memory(inp).phase_terms["projector_backward"]["act_input_embeds"] == 2 * t * 4096 * 2
    # tokens == micro_batch × seq_len is the default exactly
    assert estimate_memory(_inp7(tokens=4 * 2048)) == estimate_memory(_inp7())
    assert estimate_memory(inp).total < estimate_memory(replace(inp, tokens=None)).total


def _totals(inp: MemoryPlanInput) -> list[int]:
    return [estimate_memory(replace(inp, recompute_layers=k)).total for k in range(inp.preset.llm.layers + 1)]


@pytest.mark.parametrize("stage,kernels", [("pretrain", "hf"), ("finetune", "hf"), ("pretrain", "liger")])
def test_more_checkpointed_layers_never_cost_more_from_one_layer_on(stage, kernels):
    totals = _totals(_inp7(stage, kernels=kernels))
    assert all(a >= b for a, b in zip(totals[1:], totals[2:]))  # non-increasing for k >= 1
    assert totals[1] > totals[-1]


def test_monotone_in_k_when_the_loss_dominates():
    # tiny preset: the logits/loss working set is larger than a layer's, so the replay never sets the peak
    inp = MemoryPlanInput(TINY, "finetune", 3, 2, 2, 40, framework_bytes=0)
    totals = _totals(inp)
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert totals[0] > totals[-1]


@pytest.mark.parametrize("stage,kernels", [("pretrain", "hf"), ("pretrain", "liger")])
def test_one_checkpointed_layer_costs_no_more_than_none(stage, kernels):
    # a planner-like input (LBS 32, packed, target-only loss): a decoder layer's backward sets the peak
    totals = _totals(_inp7(stage, kernels=kernels, micro_batch=32, packed=True, loss_impl="objective"))
    assert totals[1] <= totals[0]


def test_fit_recompute_returns_the_fewest_layers_that_fit():
    inp = _inp7("pretrain", kernels="liger", micro_batch=8)
    totals = _totals(inp)
    for usable in (totals[-1], (totals[-1] + totals[1]) // 2, totals[12] + 1, totals[1]):
        k, est = fit_recompute_memory(inp, usable)
        assert est == estimate_memory(replace(inp, recompute_layers=k))
        assert est.total <= usable
        assert all(t > usable for t in totals[:k]), (usable, k)  # no smaller k fits
    assert fit_recompute_memory(inp, totals[12])[0] == 12
    assert fit_recompute_memory(inp, totals[12] - 1)[0] == 13
    assert fit_recompute_memory(inp, 10**15)[0] == 0  # everything fits: replay nothing
    k, est = fit_recompute_memory(inp, totals[-1] - 1)  # nothing fits: every layer, the caller's problem
    assert k == 32 and est.total == totals[-1] > totals[-1] - 1
    # grad_ckpt=False in the input is overridden: the fit is about checkpointing
    assert fit_recompute_memory(replace(inp, grad_ckpt=False), totals[12])[0] == 12


def test_recompute_table_gives_each_size_the_fewest_replays_that_fit():
    bound = 20996  # the synthetic data's longest 16-sample micro-batch
    inp = _inp7("finetune", kernels="inductor", micro_batch=16, packed=True, loss_impl="objective", tokens=bound)

    def total(k: int, tokens: int) -> int:
        return estimate_memory(replace(inp, recompute_layers=k, tokens=tokens)).total

    usable = total(27, bound)
    table = recompute_table(inp, usable)
    assert table[-1] == (bound, fit_recompute_memory(inp, usable)[0]) == (bound, 27)
    sizes, ks = [t for t, _ in table], [k for _, k in table]
    assert sizes == sorted(set(sizes)) and ks == sorted(set(ks)) and ks[0] < 20  # smaller ones replay far fewer
    covered = 0
    for max_tokens, k in table:
        assert total(k, max_tokens) <= usable
        if max_tokens < bound:
            assert total(k, max_tokens + 1) > usable  # the row ends where k stops fitting
        if k:
            assert total(k - 1, covered + 1) > usable  # and no fewer fit at its smallest size
        covered = max_tokens
    assert replays_for(table, 1, 32) == ks[0]
    assert replays_for(table, sizes[3], 32) == ks[3] and replays_for(table, sizes[3] + 1, 32) == ks[4]
    assert replays_for(table, bound + 1, 32) == 32  # beyond the data's bound: every layer
    # a usable size where even every layer replayed fits only up to some size: no row above it
    tight = total(32, 15000)
    (last, k_last) = recompute_table(inp, tight)[-1]
    assert k_last == 32 and last >= 15000 and total(32, last + 1) > tight
    assert recompute_table(inp, total(32, 1) - 1) == []


@pytest.mark.parametrize("bad,match", [({"recompute_layers": 33}, "recompute_layers"),
                                       ({"recompute_layers": -1}, "recompute_layers"),
                                       ({"kernels": "apex"}, "kernels"),
                                       ({"tokens": 0}, "tokens")])
def test_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        estimate_memory(_inp7(**bad))


# =============================================================================================
# planner
# =============================================================================================

H200_PACKAGES = ("torch.nn.attention.varlen", "liger_kernel", "triton")


def _h200(packages: tuple[str, ...] = H200_PACKAGES):
    machine = describe_machine("NVIDIA H200", 140 * GiB, packages=frozenset()).with_packages(*packages)
    return load_registry(machine=machine).select("nvidia")


@pytest.fixture(scope="module")
def h200():
    return _h200()


def _pretrain13(backend, **kw):
    return build_plan(backend, case="llava1.5-13b", stage="pretrain", nproc=2, **kw)


def _recompute_adjustments(plan):
    return [a for a in plan.adjustments if a.what == "recompute_layers"]


def test_h200_pretrain_plan_uses_every_lever(h200):
    plan = _pretrain13(h200)
    assert plan.kernels == "inductor" and plan.packed and plan.attn_implementation == "sdpa"
    assert plan.loss == "objective" and plan.recompute == "auto" and plan.without == ()
    assert plan.micro_batch == 32 and plan.micro_batch_tokens is None
    k = plan.recompute_layers
    assert 0 < k < 40
    (adj,) = _recompute_adjustments(plan)
    assert (adj.from_, adj.to, adj.by) == (40, k, "planner") and "LBS x MPE" in adj.why
    kern = [a for a in plan.adjustments if a.what == "kernels"]
    assert len(kern) == 1 and (kern[0].from_, kern[0].to, kern[0].by) == ("hf", "inductor", "nvidia")
    # the chosen k fits the usable memory and k - 1 does not
    usable = int(140 * GiB * 0.92)
    assert plan.usable_memory == usable
    inp = memory_input(plan)
    assert inp.kernels == "inductor" and inp.packed and inp.recompute_layers == k and inp.loss_impl == "objective"
    assert estimate_memory(inp).total <= usable < estimate_memory(replace(inp, recompute_layers=k - 1)).total
    assert plan.memory["total"] == pytest.approx(estimate_memory(inp).total / GiB)
    d = plan.to_dict()
    assert d["kernels"] == "inductor" and d["recompute_layers"] == k and d["without"] == [] and d["loss"] == "objective"


def test_without_fused_kernels_keeps_hf_and_says_why(h200):
    plan = _pretrain13(h200, without=["fused-kernels"])
    assert plan.kernels == "hf" and not any(a.what == "kernels" for a in plan.adjustments)
    assert any("inductor" in n and "--without fused-kernels" in n for n in plan.notes)
    # transformers' modules save more per token: at least as many layers must be replayed
    assert plan.recompute_layers >= _pretrain13(h200).recompute_layers
    assert plan.without == ("fused-kernels",)


def test_without_selective_recompute_replays_all(h200):
    plan = _pretrain13(h200, without=["selective-recompute"])
    assert plan.recompute == "all" and plan.recompute_layers == 40 and not _recompute_adjustments(plan)
    assert plan.memory["terms"]["act_checkpoints"] == pytest.approx(40 * 32 * 2048 * 5120 * 2 / GiB)


def test_explicit_recompute_and_all(h200):
    plan = _pretrain13(h200, recompute=5)
    assert plan.recompute == 5 and plan.recompute_layers == 5 and not _recompute_adjustments(plan)
    assert plan.memory["terms"]["act_checkpoints"] == pytest.approx(5 * 32 * 2048 * 5120 * 2 / GiB)
    assert _pretrain13(h200, recompute="all").recompute_layers == 40
    assert _pretrain13(h200, recompute="0").recompute_layers == 0
    assert _pretrain13(h200, grad_ckpt=False).recompute_layers == 0


def test_without_packing_and_target_loss(h200):
    plan = _pretrain13(h200, without=["packing"])
    assert plan.packed is False and plan.attn_implementation == "sdpa" and plan.kernels == "inductor"
    plan = _pretrain13(h200, without=["target-loss"])
    assert plan.loss == "hf" and plan.packed
    (adj,) = [a for a in plan.adjustments if a.what == "loss"]
    assert (adj.from_, adj.to, adj.by) == ("objective", "hf", "user")
    both = _pretrain13(h200, without=["packing", "target-loss", "fused-kernels", "selective-recompute"])
    assert (both.packed, both.loss, both.kernels, both.recompute_layers) == (False, "hf", "hf", 40)


def test_balanced_ranks_need_two_ranks_and_can_be_turned_off(h200):
    from accelbench.report.result import optimizations

    line = "ranks: each step's samples dealt by length"
    four = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4)
    assert four.balanced_ranks and four.to_dict()["balanced_ranks"] is True and line in optimizations({"f": four})
    one = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=1)
    assert not one.balanced_ranks and line not in optimizations({"f": one})  # one rank: nothing to balance
    off = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4, without=["balanced-ranks"])
    assert off.to_dict()["balanced_ranks"] is False


def test_the_lean_step_is_zero3s_and_can_be_turned_off(h200):
    from accelbench.report.result import optimizations

    line = "ZeRO-3 step: gradient clip and skip fused into AdamW"
    finetune = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2)
    assert finetune.lean_step and finetune.to_dict()["lean_step"] is True and line in optimizations({"f": finetune})
    pretrain = _pretrain13(h200)  # ZeRO-2 keeps DeepSpeed's step
    assert not pretrain.lean_step and line not in optimizations({"p": pretrain})
    off = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, without=["lean-step"])
    assert off.to_dict()["lean_step"] is False


def test_the_whole_tower_is_zero3s_and_can_be_turned_off(h200):
    from accelbench.report.result import optimizations

    line = "ZeRO-3: the frozen vision tower whole on every rank"
    threshold = lambda plan: plan.deepspeed_overrides().get("zero_optimization", {}).get(  # noqa: E731
        "stage3_param_persistence_threshold")
    finetune = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2)
    assert finetune.whole_tower and line in optimizations({"f": finetune}) and threshold(finetune) == 1024 * 4096
    pretrain = _pretrain13(h200)  # ZeRO-2 keeps every parameter whole
    assert not pretrain.whole_tower and line not in optimizations({"p": pretrain}) and threshold(pretrain) is None
    assert [a.to for a in finetune.adjustments if a.what == "stage3_param_persistence_threshold"] == [1024 * 4096]
    off = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, without=["whole-tower"])
    assert off.to_dict()["whole_tower"] is False and threshold(off) is None
    assert not [a for a in off.adjustments + pretrain.adjustments if a.what == "stage3_param_persistence_threshold"]
    # it costs the tower's bf16 copy beside its partition, and the estimate sees it
    extra = estimate(finetune).terms["params_persistent"] - estimate(off).terms["params_persistent"]
    assert 0.55 * 2**30 < extra < 0.6 * 2**30  # CLIP ViT-L/14-336: 303M parameters, less its norms and biases


def _finetune7(backend, tokens=20996, **kw):
    plan = build_plan(backend, case="llava1.5-7b", stage="finetune", nproc=1, **kw)
    fit_recompute(plan, backend, micro_batch_tokens=tokens)  # the synthetic data's bound at LBS 16
    return plan


def test_offload_replaces_replays_within_the_host_link_budget(h200):
    from accelbench.plan import OFFLOAD_FORWARD_PACE
    from accelbench.report.result import optimizations

    link = h200.host_link()
    assert link == pytest.approx(0.8 * 16 * 3.938e9)  # PCIe 5 x16 at the NVIDIA backend's copy efficiency
    plan, off = _finetune7(h200), _finetune7(h200, without=["offload-activations"])
    k, o = plan.recompute_layers, plan.offload_layers
    assert (off.recompute_layers, off.offload_layers) == (24, 0) and 0 < o and k < off.recompute_layers
    # within the budget: the copies to the host fit in the forward of the layers that are not replayed
    saved = layer_saved_bytes_per_token(memory_input(plan))
    forward_per_token = 2 * llm_layer_matmul_params(P7) / (OFFLOAD_FORWARD_PACE * 989.4e12)
    assert o * saved / link <= (32 - k) * forward_per_token
    # the fewest replays: one fewer does not fit with any offload count the budget allows
    usable = plan.usable_memory
    assert estimate_memory(memory_input(plan)).total <= usable
    fewer = replace(memory_input(plan), recompute_layers=k - 1)
    budget = int((32 - (k - 1)) * forward_per_token * link / saved)
    assert all(estimate_memory(replace(fewer, offload_layers=n)).total > usable for n in range(1, budget + 1))
    (record,) = [a for a in plan.adjustments if a.what == "offload_layers"]
    assert (record.from_, record.to) == (0, o)
    assert f"{k} layers replayed" in record.why and "instead of 24" in record.why
    assert plan.to_dict()["offload_layers"] == o and plan.offload_layer_bytes == 20996 * saved
    line = f"activations of up to {o} decoder layers (f) wait in host memory, copied beside the compute"
    assert line in optimizations({"f": plan}) and not any("host memory" in x for x in optimizations({"f": off}))
    # each micro-batch offloads the fewest layers that fit at its size and replay count; the data's longest, all o
    table = plan.offload_table
    assert table[-1] == [20996, o] and table[0][1] == 0 and [r[0] for r in table] == sorted(r[0] for r in table)
    inp = memory_input(plan)
    for tokens, n in table:
        at = replace(inp, recompute_layers=replays_for(plan.recompute_table, tokens, 32), tokens=tokens)
        assert estimate_memory(replace(at, offload_layers=n)).total <= usable
        assert n == 0 or estimate_memory(replace(at, offload_layers=n - 1)).total > usable
    assert offloads_for(table, 5000, o) == 0 and offloads_for(table, 20996, o) == o
    # 13B on 4 GPUs: the longest micro-batch replays none once 9 are offloaded; the mean one needs neither
    four = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4)
    fit_recompute(four, h200, micro_batch_tokens=21000)
    assert (four.recompute_layers, four.offload_layers) == (0, 9) and offloads_for(four.offload_table, 12300, 9) == 0
    # a re-fit replaces the record; where nothing replays, nothing is offloaded
    fit_recompute(plan, h200, micro_batch_tokens=20996)
    assert len([a for a in plan.adjustments if a.what == "offload_layers"]) == 1
    small = _finetune7(h200, tokens=7000)
    assert small.recompute_layers == small.offload_layers == 0


def test_offload_count_given_by_hand(h200):
    plan = _finetune7(h200, offload=4)
    auto = _finetune7(h200)
    assert plan.offload_layers == 4 and auto.recompute_layers < plan.recompute_layers < 24
    assert "--offload 4" in [a for a in plan.adjustments if a.what == "offload_layers"][0].why
    fixed = _finetune7(h200, recompute=20, offload=6)  # a fixed replay count: offloaded among the kept layers
    assert fixed.recompute_layers == 20 and fixed.offload_layers == 6
    assert memory_input(fixed).offloaded_layers == 6
    assert _finetune7(h200, offload=0).offload_layers == 0
    with pytest.raises(ConfigError, match="contradict"):
        _finetune7(h200, offload=3, without=["offload-activations"])
    for bad in ("-1", "x", 33):
        with pytest.raises(ConfigError, match="--offload"):
            _finetune7(h200, offload=bad)
    cpu = load_registry(machine=describe_machine("cpu", 24 * GiB)).select("cpu")
    assert cpu.host_link() is None
    with pytest.raises(ConfigError, match="no host link"):
        build_plan(cpu, case="tiny", stage="finetune", offload=1)


def test_offloaded_layers_keep_only_their_small_tensors_on_the_device():
    inp = _inp7("finetune", kernels="inductor", elementwise_recompute=True, recompute_layers=10, tokens=12000)
    base = estimate_memory(inp).phase_terms["backward"]
    moved = estimate_memory(replace(inp, offload_layers=5)).phase_terms["backward"]
    per_layer = 12000 * layer_saved_bytes_per_token(inp)
    assert moved["act_kept_layers"] == base["act_kept_layers"] - 5 * per_layer
    assert moved["act_offloaded_layers"] == 5 * 12000 * 2 * 4  # the two norms' fp32 rstd
    # no more than the kept layers below the top offload.LOOKAHEAD: 32 - 10 - 2
    assert replace(inp, offload_layers=50).offloaded_layers == 20
    with pytest.raises(ValueError, match="offload_layers"):
        estimate_memory(replace(inp, offload_layers=-1))


def test_elementwise_recompute_is_on_where_memory_makes_layers_replay(h200):
    from accelbench.report.result import optimizations

    finetune = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2)
    off = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, without=["elementwise-recompute"])
    assert finetune.kernels == off.kernels == "inductor"
    assert finetune.elementwise_recompute and not off.elementwise_recompute
    assert memory_input(finetune).elementwise_recompute and not memory_input(off).elementwise_recompute
    # smaller kept layers: fewer layers replayed at the same usable memory, and the record says how many fewer
    assert 0 < finetune.recompute_layers < off.recompute_layers
    record = [a for a in finetune.adjustments if a.what == "elementwise_recompute"]
    assert len(record) == 1 and f"instead of {off.recompute_layers}" in record[0].why
    assert finetune.to_dict()["elementwise_recompute"] is True and off.to_dict()["elementwise_recompute"] is False
    line = "compiled layers (f): element-wise results recomputed, not saved"
    assert line in optimizations({"f": finetune}) and line not in optimizations({"f": off})
    # where every layer keeps its activations anyway, recomputing would only cost time: 13B pretrain at the
    # synthetic data's bound (measured 0 of 40 replayed), and the record of the fit without that bound is dropped
    pretrain = _pretrain13(h200)
    assert pretrain.recompute_layers > 0 and pretrain.elementwise_recompute  # LBS x MPE = 65536 tokens
    fit_recompute(pretrain, h200, micro_batch_tokens=19589)
    assert pretrain.recompute_layers == 0 and not pretrain.elementwise_recompute
    assert not [a for a in pretrain.adjustments if a.what == "elementwise_recompute"]
    # a fixed replay count, or eager layers, leave Inductor's default
    assert not build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, recompute=20).elementwise_recompute
    eager = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, without=["compiled-layers"])
    assert eager.kernels == "liger" and not eager.elementwise_recompute


def test_without_compiled_layers_takes_the_next_kernel_set(h200):
    plan = _pretrain13(h200, without=["compiled-layers"])
    assert plan.kernels == "liger" and any("inductor" in n and "--without compiled-layers" in n for n in plan.notes)
    # Inductor's default partitioner is counted as Liger in the memory model: the same layers are replayed
    assert plan.recompute_layers == _pretrain13(h200, without=["elementwise-recompute"]).recompute_layers


def test_compiled_layers_make_each_decoder_layer_a_zero3_fetch_unit(h200):
    finetune = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4)
    zero = finetune.deepspeed_overrides()["zero_optimization"]
    assert finetune.kernels == "inductor"
    assert zero["leaf_module"]["classes"] == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    assert zero["memory_efficient_linear"] is False
    assert zero["stage3_prefetch_bucket_size"] == 500_000_000  # the buckets stay
    eager = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4, without=["compiled-layers"])
    assert "leaf_module" not in eager.deepspeed_overrides()["zero_optimization"]
    # the memory model reads the same config: a fetch unit holds a whole layer's gradients at once
    assert finetune.memory["terms"]["largest_param_grad"] > eager.memory["terms"]["largest_param_grad"]
    assert _pretrain13(h200).deepspeed_overrides() == {}  # ZeRO-2 has no fetch hooks to move
    assert not any("compiled layers need" in n for n in finetune.notes)
    # a user's file that undoes them is merged (the user's word wins) and named in the plan's notes
    undone = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4,
                        ds_overrides={"zero_optimization": {"memory_efficient_linear": True}})
    assert undone.deepspeed_overrides()["zero_optimization"]["memory_efficient_linear"] is True
    assert any("compiled layers need" in n and "--without compiled-layers" in n for n in undone.notes)
    # a file listing the decoder layer alone (benchmarks/gpu/ds/zero3-leaf.json) replaces the list: the (eager)
    # vision layer is no unit then, which breaks no graph; one leaving the decoder layer out does, and says so
    decoder_only = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4, ds_overrides={
        "zero_optimization": {"leaf_module": {"classes": ["LlamaDecoderLayer"]}}})
    assert not any("compiled layers need" in n for n in decoder_only.notes)
    vision_only = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=4, ds_overrides={
        "zero_optimization": {"leaf_module": {"classes": ["CLIPEncoderLayer"]}}})
    assert any("compiled layers need" in n for n in vision_only.notes)


def test_liger_needs_its_packages_and_ampere():
    assert _pretrain13(_h200(("torch.nn.attention.varlen",))).kernels == "hf"  # no triton: neither set
    assert _pretrain13(_h200(("torch.nn.attention.varlen", "triton"))).kernels == "inductor"  # liger_kernel missing
    assert _pretrain13(_h200(("torch.nn.attention.varlen", "triton")), without=["compiled-layers"]).kernels == "hf"
    machine = describe_machine("Tesla V100-SXM2-32GB", 32 * GiB, packages=frozenset(H200_PACKAGES))
    v100 = build_plan(load_registry(machine=machine).select("nvidia"), case="tiny", stage="pretrain", nproc=1)
    assert v100.kernels == "hf"


def test_iluvatar_plan_keeps_hf_kernels():
    machine = describe_machine("Iluvatar BI-V150", 32 * GiB,
                               packages=frozenset({"flash_attn", "liger_kernel", "triton"}))
    backend = load_registry(machine=machine).select("iluvatar")
    plan = build_plan(backend, case="llava1.5-13b", stage="finetune", nproc=16)
    assert plan.backend == "iluvatar" and plan.kernels == "hf"
    assert not any(a.what == "kernels" for a in plan.adjustments)


@pytest.mark.parametrize("kw,needle", [({"without": ["nosuch"]}, "--without nosuch"),
                                       ({"without": ["packing", "turbo"]}, "--without turbo"),
                                       ({"recompute": 41}, "--recompute 41"),
                                       ({"recompute": -1}, "--recompute -1"),
                                       ({"recompute": "x"}, "--recompute 'x'")])
def test_bad_levers_and_recompute_are_config_errors(h200, kw, needle):
    with pytest.raises(ConfigError) as err:
        _pretrain13(h200, **kw)
    assert needle in str(err.value)


def test_parse_recompute():
    assert parse_recompute("auto", 40) == "auto" and parse_recompute("all", 40) == "all"
    assert parse_recompute("7", 40) == 7 and parse_recompute(40, 40) == 40 and parse_recompute(0, 40) == 0
    for bad in (41, "41", "-1", "x", None, "1.5"):
        with pytest.raises(ConfigError):
            parse_recompute(bad, 40)
    assert set(LEVERS) == {"packing", "selective-recompute", "batch-recompute", "target-loss", "fused-kernels",
                           "compiled-layers", "loader-workers", "zero3-buckets", "balanced-ranks", "lean-step",
                           "elementwise-recompute", "offload-activations", "whole-tower"}


def test_refit_with_the_data_bound_replaces_the_record(h200):
    plan = _pretrain13(h200)
    k_full = plan.recompute_layers
    total_full = plan.memory["total"]
    fit_recompute(plan, h200, micro_batch_tokens=40_000)  # the data's longest micro-batch: < 32 × 2048
    assert plan.micro_batch_tokens == 40_000
    assert plan.recompute_layers < k_full
    (adj,) = _recompute_adjustments(plan)  # replaced, not appended
    assert adj.to == plan.recompute_layers and adj.from_ == 40 and "40000 tokens" in adj.why
    # fewer layers replayed for fewer tokens: the estimate still fits (it need not shrink)
    assert plan.memory["total"] * GiB <= plan.usable_memory and plan.memory["total"] != total_full
    inp = memory_input(plan)
    assert inp.tokens == 40_000
    usable = plan.usable_memory
    k = plan.recompute_layers
    assert estimate_memory(inp).total <= usable
    if k > 0:
        assert estimate_memory(replace(inp, recompute_layers=k - 1)).total > usable
    # a small bound needs no replay at all
    fit_recompute(plan, h200, micro_batch_tokens=4_000)
    assert plan.recompute_layers == 0 and len(_recompute_adjustments(plan)) == 1
    # a bound so large that even full recompute does not fit: every layer, and no stale record left
    fit_recompute(plan, h200, micro_batch_tokens=10**6)
    assert plan.recompute_layers == 40 and _recompute_adjustments(plan) == []
    assert plan.to_dict()["micro_batch_tokens"] == 10**6


def test_each_micro_batch_replays_what_its_size_needs(h200):
    def finetune(**kw):
        plan = build_plan(h200, case="llava1.5-13b", stage="finetune", nproc=2, **kw)
        fit_recompute(plan, h200, micro_batch_tokens=20996)
        return plan

    plan = finetune()
    table, k = plan.recompute_table, plan.recompute_layers
    assert table[-1] == [20996, k] and 0 < k and table[0][1] < k
    assert plan.to_dict()["recompute_table"] == table
    (adj,) = [a for a in plan.adjustments if a.what == "recompute_table"]
    assert adj.to == f"{table[0][1]}-{k} by micro-batch size" and "--without batch-recompute" in adj.why
    fit_recompute(plan, h200, micro_batch_tokens=20996)  # a re-fit replaces the record
    assert len([a for a in plan.adjustments if a.what == "recompute_table"]) == 1
    # off: by the lever, by a fixed --recompute, and for eager ZeRO-3 layers (whose replays ZeRO-3 fetches for)
    off = finetune(without=["batch-recompute"])
    assert off.recompute_table == [] and off.recompute_layers == k
    assert not any(a.what == "recompute_table" for a in off.adjustments)
    assert finetune(recompute=10).recompute_table == []
    eager = finetune(without=["compiled-layers"])
    assert eager.recompute_table == [] and eager.recompute_layers > 0
    assert sum(n.startswith(FIXED_REPLAYS_NOTE) for n in eager.notes) == 1
    # ZeRO-2 fetches nothing: its eager layers vary too
    pretrain = _pretrain13(h200, without=["compiled-layers"])
    fit_recompute(pretrain, h200, micro_batch_tokens=60_000)
    assert pretrain.recompute_layers > 0 and pretrain.recompute_table[-1] == [60_000, pretrain.recompute_layers]


def test_refit_leaves_explicit_recompute_alone(h200):
    plan = _pretrain13(h200, recompute=3)
    fit_recompute(plan, h200, micro_batch_tokens=4_000)
    assert plan.recompute_layers == 3 and plan.micro_batch_tokens == 4_000 and not _recompute_adjustments(plan)
    assert plan.memory["terms"]["act_checkpoints"] == pytest.approx(3 * 4_000 * 5120 * 2 / GiB)


# =============================================================================================
# data: the micro-batch token bound
# =============================================================================================

def test_micro_batch_token_bound():
    assert micro_batch_token_bound([5, 1, 9, 3], 2) == 14
    assert micro_batch_token_bound([5, 1, 9, 3], 1) == 9
    assert micro_batch_token_bound([5, 1, 9, 3], 4) == 18
    assert micro_batch_token_bound([5, 1, 9, 3], 10) == 18  # fewer samples than a micro-batch
    assert micro_batch_token_bound([7, 7, 2], 2) == 14  # ties
    assert micro_batch_token_bound([], 3) == 0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from accelbench.train.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth"), n_pretrain=12, n_finetune=12, mmmu=False)


def test_check_data_bound_matches_the_encoded_samples(synth, tmp_path):
    from transformers import AutoTokenizer

    from accelbench.train.data import LlavaDataset, load_records
    from accelbench.train.datacheck import DATA_CHECK, check_data

    lbs, mpe = 3, 2048
    cfg = SimpleNamespace(
        data=SimpleNamespace(tokenizer=str(synth["tokenizer"]), pretrain_json=str(synth["pretrain_json"]),
                             finetune_json=str(synth["finetune_json"]), image_folder=str(synth["image_folder"])),
        stages=["pretrain", "finetune"], plans={s: {"MPE": mpe, "LBS": lbs} for s in ("pretrain", "finetune")},
        bad_samples="skip", max_bad_fraction=0.5, run_dir=str(tmp_path), case="tiny")
    checked = check_data(cfg)
    tok = AutoTokenizer.from_pretrained(synth["tokenizer"])
    for stage, template in (("pretrain", "plain"), ("finetune", "vicuna_v1")):
        records = load_records(cfg.data.pretrain_json if stage == "pretrain" else cfg.data.finetune_json)
        ds = LlavaDataset(records, cfg.data.image_folder, tok, template=template, image_tokens=16,
                          image_token_id=1023, image_size=56, model_max_length=mpe)
        lengths = sorted((len(ds.encode(r)[0]) for r in records), reverse=True)
        assert checked[stage]["used"] == len(records)
        assert checked[stage]["max_micro_batch_tokens"] == sum(lengths[:lbs]), stage
        written = json.loads((tmp_path / stage / DATA_CHECK).read_text())
        assert written["max_micro_batch_tokens"] == checked[stage]["max_micro_batch_tokens"]


def test_validate_records_reports_text_tokens_of_kept_records(synth):
    from transformers import AutoTokenizer

    from accelbench.train.data import LlavaDataset, load_records, validate_records

    tok = AutoTokenizer.from_pretrained(synth["tokenizer"])
    records = load_records(synth["finetune_json"])
    bad = {"id": "bad", "conversations": []}
    counts: list[int] = [999]  # replaced, not appended to
    kept, report = validate_records([bad] + records, synth["image_folder"], tokenizer=tok, model_max_length=2048,
                                    max_bad_fraction=0.5, text_tokens=counts)
    assert report.bad == 1 and len(counts) == len(kept) == len(records)
    ds = LlavaDataset(records, synth["image_folder"], tok, template="vicuna_v1", image_tokens=16,
                      image_token_id=1023, image_size=56, model_max_length=4096)
    for n, r in zip(counts, kept):
        ids = ds.encode(r)[0]
        assert n == len(ids) - ids.count(1023), r["id"]


# =============================================================================================
# FLOPs
# =============================================================================================

def test_recompute_flops_scale_with_the_replayed_layers():
    s = 40
    n_layer = llm_layer_matmul_params(TINY)
    # tiny, 2 layers: replay without down_proj (non-reentrant early stop) + attention forward
    full = 2 * (2 * (n_layer - 64 * 172) * s + 4 * s * s * 64)
    kw = dict(grad_ckpt=True, frozen_vision_backward=False)  # no CLIP replay: only the LLM term counts
    assert step_flops(TINY, [s], 1, "finetune", **kw).recompute_flops == full
    assert step_flops(TINY, [s], 1, "finetune", recompute_layers=2, **kw).recompute_flops == full
    assert step_flops(TINY, [s], 1, "finetune", recompute_layers=1, **kw).recompute_flops == full // 2
    zero = step_flops(TINY, [s], 1, "finetune", recompute_layers=0, **kw)
    assert zero.recompute_flops == 0
    assert zero.hardware_flops == zero.model_flops
    assert step_flops(TINY, [s], 1, "finetune", grad_ckpt=False, recompute_layers=2,
                      frozen_vision_backward=False).recompute_flops == 0


@pytest.mark.parametrize("k", [0, 1, 13, 40])
def test_recompute_flops_13b_fraction(k):
    lens = [2048, 1500, 900]
    kw = dict(grad_ckpt=True, frozen_vision_backward=False)
    full = step_flops(P13, lens, 3, "pretrain", **kw)
    part = step_flops(P13, lens, 3, "pretrain", recompute_layers=k, **kw)
    assert part.recompute_flops == full.recompute_flops * k // 40
    assert part.model_flops == full.model_flops
    assert part.hardware_flops == full.hardware_flops - full.recompute_flops + part.recompute_flops
    # with the target-only loss, the chunked logits' replay is added on top, independent of k
    head = 2 * 32000 * 5120 * 700
    with_loss = step_flops(P13, lens, 3, "pretrain", recompute_layers=k, lm_head_tokens=700, **kw)
    assert with_loss.recompute_flops == part.recompute_flops + head


# =============================================================================================
# model: only the first llm_layers decoder layers are checkpointed; the math does not change
# =============================================================================================

@pytest.fixture(scope="module")
def tiny_batch():
    import torch

    from accelbench.train.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 1000, (2, 30), generator=g)
    ids = torch.cat([text[:, :1], torch.full((2, 16), 1023), text[:, 1:]], dim=1)
    labels = ids.clone()
    labels[:, :20] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, 56, 56, generator=g)}


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(TINY.llava_config(image_token_id=1023),
                                                      attn_implementation="sdpa", dtype=torch.float32)


def _loss_and_grads(base, batch, llm_layers, count_replays=False):
    from accelbench.train.model import enable_checkpointing, freeze_for_stage
    from accelbench.train.objective import LlavaObjective

    model = copy.deepcopy(base)
    trainable = freeze_for_stage(model, "finetune")
    enable_checkpointing(model, llm_layers)
    model.train()
    layers = model.model.language_model.layers
    calls = [0] * len(layers)
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    loss = LlavaObjective(model)(**batch)
    loss.backward()
    for h in hooks:
        h.remove()
    flags = [layer.gradient_checkpointing for layer in layers]
    return loss.detach(), [p.grad.detach().clone() for p in trainable], flags, calls, model


def test_enable_checkpointing_first_layers_only(tiny_model, tiny_batch):
    import torch

    ref_loss, ref_grads, flags, calls, model = _loss_and_grads(tiny_model, tiny_batch, None)
    assert flags == [True, True] and calls == [2, 2]  # every layer's forward is replayed in backward
    assert all(layer.gradient_checkpointing for layer in model.model.vision_tower.encoder.layers)
    for llm_layers, want_flags, want_calls in ((1, [True, False], [2, 1]), (0, [False, False], [1, 1]),
                                               (2, [True, True], [2, 2])):
        loss, grads, flags, calls, model = _loss_and_grads(tiny_model, tiny_batch, llm_layers)
        assert flags == want_flags and calls == want_calls, llm_layers
        # CLIP's layers keep transformers' checkpointing flag, which does nothing: the tower runs without autograd
        assert all(layer.gradient_checkpointing for layer in model.model.vision_tower.encoder.layers)
        assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-6)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in ref_grads)


def test_objective_loss_choice(tiny_model, tiny_batch):
    import torch

    from accelbench.train.objective import LlavaObjective

    with torch.no_grad():
        ours = LlavaObjective(tiny_model.eval())(**tiny_batch)
        hf = LlavaObjective(tiny_model, loss="hf")(**tiny_batch)
        ref = tiny_model(**tiny_batch).loss
    assert hf.item() == ref.item()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss"):
        LlavaObjective(tiny_model, loss="liger")


# =============================================================================================
# CLI
# =============================================================================================

def test_cli_plan_json_shows_the_levers(cli):
    out = cli("plan", "--case", "llava1.5-13b", "--stage", "pretrain", "--nproc", "2", "--device-name", "NVIDIA H200",
              "--device-memory", "140GiB", "--assume-package", "torch.nn.attention.varlen",
              "--assume-package", "liger_kernel", "--assume-package", "triton", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["backend"] == "nvidia" and plan["kernels"] == "inductor" and plan["packed"] is True
    assert plan["without"] == [] and plan["recompute"] == "auto" and plan["micro_batch_tokens"] is None
    assert 0 < plan["recompute_layers"] < 40
    by_what = {a["what"]: a for a in plan["adjustments"]}
    assert by_what["recompute_layers"]["to"] == plan["recompute_layers"] and by_what["kernels"]["to"] == "inductor"


@pytest.mark.parametrize("args,needle", [(("--without", "nosuch"), "--without nosuch: unknown lever"),
                                         (("--recompute", "41"), "--recompute '41' is impossible")])
def test_cli_bad_lever_is_one_line(cli, args, needle):
    out = cli("plan", "--case", "llava1.5-13b", "--stage", "pretrain", "--nproc", "2", "--device-name", "NVIDIA H200",
              "--device-memory", "140GiB", *args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_profile_steps_parse_and_categories():
    from accelbench.errors import ConfigError
    from accelbench.train.profiling import category, parse_profile_steps

    assert parse_profile_steps("3", 20) == (3, 3) and parse_profile_steps("3-4", 20) == (3, 4)
    assert parse_profile_steps(None) is None
    for bad in ("0", "4-3", "x", "19-21"):
        with pytest.raises(ConfigError):
            parse_profile_steps(bad, 20)
    assert category("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert category("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    assert category("aten::mm") == "matmul"
    assert category("pytorch_flash::flash_fwd_kernel") == "attention"
    assert category("Memcpy HtoD (Pageable -> Device)") == "memory"
    assert category("triton_rms_norm_forward") == "other"


def test_device_timeline_busy_idle_and_exposed_communication():
    from accelbench.train.profiling import device_timeline

    def k(name, ts, dur, pid=0):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": pid}

    # compute 0-4000 µs and 4500-10000 (a 0.5 ms gap, under the 1 ms threshold) and 12000-14000 (a 2 ms gap);
    # an all-gather 3000-5000 of which 4000-4500 runs alone; another device's kernel is ignored
    events = [k("nvjet_gemm", 0, 3000), k("triton_rms", 2000, 2000), k("nvjet_gemm", 4500, 5500),
              k("ncclDevKernel_AllGather", 3000, 2000), k("nvjet_gemm", 12000, 2000),
              k("nvjet_gemm", 50000, 9000, pid=1), {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1},
              # phases on the device: backward 0-10000 holds the 0.5 ms gap, the optimizer step 10000-14000 the
              # 2 ms one; another device's phase is ignored
              {"cat": "gpu_user_annotation", "name": "accelbench/backward", "ts": 0, "dur": 10000, "pid": 0},
              {"cat": "gpu_user_annotation", "name": "accelbench/backward", "ts": 3000, "dur": 2000, "pid": 0,
               "tid": 9},  # the same phase's span on the communication stream: counted once
              {"cat": "gpu_user_annotation", "name": "accelbench/optimizer_step", "ts": 10000, "dur": 4000, "pid": 0},
              {"cat": "gpu_user_annotation", "name": "accelbench/backward", "ts": 50000, "dur": 9000, "pid": 1}]
    t = device_timeline(events, steps=2)
    assert t["compute_idle_s_by_phase"] == {"backward": pytest.approx(0.0005 / 2),
                                            "optimizer_step": pytest.approx(0.002 / 2)}
    # without the optimizer step's span its 2 ms gap is idle outside every phase
    no_step = device_timeline([e for e in events if e["name"] != "accelbench/optimizer_step"], steps=2)
    assert no_step["compute_idle_s_by_phase"] == {"backward": pytest.approx(0.0005 / 2),
                                                  "outside_phases": pytest.approx(0.002 / 2)}
    assert t["span_s"] == pytest.approx(0.014 / 2)
    assert t["compute_busy_s"] == pytest.approx(0.0115 / 2)
    assert t["compute_busy_share"] == pytest.approx(11.5 / 14)
    assert t["communication_s"] == pytest.approx(0.002 / 2)
    assert t["communication_exposed_s"] == pytest.approx(0.0005 / 2)
    assert t["compute_gaps_over_1ms_s"] == pytest.approx(0.001)
    assert t["largest_gaps_s"] == {"nvjet_gemm -> nvjet_gemm": pytest.approx(0.001)}
    assert t["kernel_s_by_category"] == {"communication": pytest.approx(0.001), "matmul": pytest.approx(0.0105 / 2),
                                         "other": pytest.approx(0.001)}
    assert list(t["top_kernels_s"])[0] == "nvjet_gemm" and len(t["top_kernels_s"]) == 3
    assert device_timeline([], steps=1) == {}
    only_comm = device_timeline([k("ncclDevKernel_AllGather", 0, 1000)], steps=1)
    assert only_comm["compute_busy_s"] == 0 and only_comm["communication_exposed_s"] == pytest.approx(0.001)


def _launched(phase_spans, launches):
    """A trace: host phase spans on the main thread (tid 1); each launch (host µs, thread, kernel name, device
    start µs, µs) a runtime call and its kernel, joined by correlation id."""
    events = [{"cat": "user_annotation", "name": f"accelbench/{name}", "ts": ts, "dur": dur, "tid": 1}
              for name, ts, dur in phase_spans]
    for corr, (host_ts, tid, name, ts, dur) in enumerate(launches):
        events += [{"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": host_ts, "dur": 5, "tid": tid,
                    "args": {"correlation": corr}},
                   {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "args": {"correlation": corr}}]
    return events


def test_idle_time_goes_to_the_phase_that_launched_the_kernel_waited_for():
    from accelbench.train.profiling import device_timeline

    # the backward's kernels come from autograd's thread (tid 2), inside the main thread's backward span; the
    # device idles 1 ms before the backward's second GEMM and 3 ms before a kernel launched between phases
    events = _launched([("forward", 0, 1000), ("backward", 1000, 5000)],
                       [(10, 1, "nvjet_fwd", 100, 900), (1100, 2, "nvjet_bwd", 1000, 1000),
                        (1200, 2, "ncclDevKernel_ReduceScatter", 1500, 3000),  # communication: not waited for
                        (1300, 2, "nvjet_bwd", 3000, 1000), (7000, 1, "reduce_kernel", 7000, 100)])
    t = device_timeline(events, steps=1)
    assert t["compute_idle_s_by_phase"] == {"backward": pytest.approx(0.001), "outside_phases": pytest.approx(0.003)}
    assert t["communication_exposed_s"] == pytest.approx(0.0015)  # 2000-3000 and 4000-4500 µs


def test_idle_time_at_the_edges_nested_phases_and_launches_outside_every_phase():
    from accelbench.train.profiling import device_timeline, phase_times

    # an all-gather runs 2 ms before the first compute kernel: idle that waited for no phase's kernel. The data
    # phase nests in the forward: a launch inside it belongs to data, one after it to the forward again
    events = _launched([("forward", 0, 10000), ("data", 2000, 1000)],
                       [(100, 1, "ncclDevKernel_AllGather", 0, 2000), (2500, 1, "nvjet", 2000, 1000),
                        (5000, 1, "nvjet", 4000, 1000)])
    t = device_timeline(events, steps=1)
    assert t["compute_idle_s_by_phase"] == {"forward": pytest.approx(0.001), "outside_phases": pytest.approx(0.002)}
    assert sum(t["compute_idle_s_by_phase"].values()) == pytest.approx(t["span_s"] - t["compute_busy_s"])
    assert phase_times(events, steps=1)["data"]["device_s"] == pytest.approx(0.001)
    # phases exist but no kernel was launched in one: the idle time still shows, outside every phase
    outside = _launched([("data", 20000, 100)], [(10, 1, "nvjet", 100, 900), (900, 1, "nvjet", 3000, 1000)])
    assert device_timeline(outside, steps=1)["compute_idle_s_by_phase"] == {"outside_phases": pytest.approx(0.002)}
    # a host-to-device copy is the data phase's device work
    copy = _launched([("data", 0, 1000)], [(10, 1, "nvjet", 500, 100)])
    copy.append({"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 100, "dur": 200, "pid": 0,
                 "args": {"correlation": 99}})
    copy.append({"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 20, "dur": 5, "tid": 1,
                 "args": {"correlation": 99}})
    assert phase_times(copy, steps=1)["data"]["device_s"] == pytest.approx(0.0005)  # 100-600 µs


def test_idle_gaps_split_into_launched_late_and_queued_with_the_host_activity():
    from accelbench.train.profiling import device_timeline

    # main thread (tid 1): forward 0-10000 µs; each launch call takes 5 µs. The device idles from 1000 to 3000:
    # kernel 2's launch call returned at 1500 (0.5 ms late), then it waited 1.5 ms (queued).
    # Kernel 3's launch returned at 7000, 3 ms after the device went idle at 4000: the host spent 4000-5000 in a
    # cudaStreamSynchronize, 5000-6000 in an aten::copy_ holding a cudaMemcpyAsync 5200-5300, and 6000-7000 in
    # Python inside the forward span (and its launch call).
    events = _launched([("forward", 0, 10000)],
                       [(10, 1, "nvjet", 100, 900), (1495, 1, "nvjet", 3000, 1000), (6995, 1, "nvjet", 7000, 500)])
    events += [{"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 4000, "dur": 1000, "tid": 1},
               {"cat": "cpu_op", "name": "aten::copy_", "ts": 5000, "dur": 1000, "tid": 1},
               {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 5200, "dur": 100, "tid": 1},
               {"cat": "cpu_op", "name": "aten::mm", "ts": 4000, "dur": 5, "tid": 2}]  # another thread
    t = device_timeline(events, steps=1)
    assert t["compute_idle_s_by_phase"] == {"forward": pytest.approx(0.005)}
    assert t["compute_idle_s_by_cause"] == {"forward": {"launched_late": pytest.approx(0.0035),
                                                        "queued": pytest.approx(0.0015)}}
    activity = t["launched_late_host_activity_s"]
    assert activity == {"cudaStreamSynchronize": pytest.approx(0.001), "aten::copy_": pytest.approx(0.0009),
                        "accelbench/forward": pytest.approx(0.00149), "cudaMemcpyAsync": pytest.approx(0.0001),
                        "cudaLaunchKernel": pytest.approx(0.00001)}
    assert sum(activity.values()) == pytest.approx(sum(t["compute_idle_s_by_cause"]["forward"].values()) - 0.0015)
    # without launch records there is no cause to give
    bare = [e for e in events if e["cat"] in ("kernel", "user_annotation")]
    assert "compute_idle_s_by_cause" not in device_timeline(bare, steps=1)


def test_host_activity_names_the_innermost_event_at_every_moment():
    from accelbench.train.profiling import _host_activity, _innermost_segments

    def op(name, ts, dur, tid=1):
        return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    # A 0-100 µs holds B 20-40 (and a zero-length C at 20) and D from 60, which outlives A and is cut at A's end;
    # E 200-210 stands alone; thread 2's op does not count for thread 1
    segments = _innermost_segments([op("A", 0, 100), op("B", 20, 20), op("C", 20, 0), op("D", 60, 70),
                                    op("E", 200, 10), op("F", 0, 300, tid=2)])
    into: dict = {}
    _host_activity(segments[1], 0.0, 300e-6, into)
    assert into == {"A": pytest.approx(40e-6), "B": pytest.approx(20e-6), "D": pytest.approx(40e-6),
                    "E": pytest.approx(10e-6), "idle or untraced": pytest.approx(190e-6)}
    # a window starting inside a segment counts only its own part of it
    part: dict = {}
    _host_activity(segments[1], 30e-6, 70e-6, part)
    assert part == {"B": pytest.approx(10e-6), "A": pytest.approx(20e-6), "D": pytest.approx(10e-6)}


def test_read_trace_names_a_file_that_is_no_trace(tmp_path):
    import gzip
    import json

    from accelbench.errors import ConfigError
    from accelbench.train.profiling import read_trace

    good = tmp_path / "trace.json.gz"
    with gzip.open(good, "wt") as fh:
        json.dump({"traceEvents": [{"cat": "kernel", "name": "k", "ts": 0, "dur": 1}]}, fh)
    assert read_trace(good) == [{"cat": "kernel", "name": "k", "ts": 0, "dur": 1}]
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    for bad in (plain, tmp_path / "missing.json.gz"):
        with pytest.raises(ConfigError, match=f"{bad.name}: not a readable gzipped chrome trace"):
            read_trace(bad)


def test_phase_times_host_and_device():
    from accelbench.train.profiling import phase_times

    # two runs of the forward; the second launches a kernel from another thread; each run's device span runs
    # from its first kernel to its last, and spans that overlap are counted once
    events = _launched([("forward", 0, 4000), ("forward", 9000, 2000), ("data", 12000, 1000)],
                       [(10, 1, "nvjet", 100, 2000), (3000, 1, "triton", 3000, 3100),
                        (9100, 2, "nvjet", 9100, 1000), (9500, 1, "nvjet", 10100, 900)])
    events.append({"cat": "user_annotation", "name": "aten::mm", "ts": 0, "dur": 5})
    # the data phase launched nothing: it has no device time
    assert phase_times(events, steps=2) == {"data": {"host_s": pytest.approx(0.0005)},
                                            "forward": {"host_s": pytest.approx(0.003),
                                                        "device_s": pytest.approx((0.006 + 0.0019) / 2)}}
    # without launch records the device-side annotation stands in
    kernels = [e for e in events if e["cat"] == "kernel"]
    fallback = [{**k, "args": {}} for k in kernels] + [e for e in events if e["cat"] == "user_annotation"] + \
        [{"cat": "gpu_user_annotation", "name": "accelbench/forward", "ts": 100, "dur": 6000, "pid": 0}]
    assert phase_times(fallback, steps=2)["forward"] == {"host_s": pytest.approx(0.003),
                                                         "device_s": pytest.approx(0.006 / 2)}


@pytest.mark.slow
def test_run_profile_writes_summaries(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELBENCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "accelbench", "run", "--stages", "pretrain", "--steps", "4",
                          "--profile", "2-3", "--no-eval", "--quiet", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    prof = tmp_path / "r" / "pretrain" / "profile"
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["steps"] == [2, 3] and summary["wall_s"] > 0 and summary["basis"] == "cpu"
    assert summary["seconds_per_step"]["matmul"] > 0
    phases = {k: v["host_s"] for k, v in summary["phases_s_per_step"].items()}
    assert set(phases) == {"data", "forward", "backward", "optimizer_step"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= summary["wall_s"] / 2 * 1.05  # per step, within the profiled wall time
    assert "aten::mm" in (prof / "summary.txt").read_text()
    assert (prof / "trace.json.gz").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "accelbench", "run", "--steps", "4", "--profile", "3-9"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--profile '3-9' is impossible" in bad.stderr


def test_speed_options_conflicts_and_resume(tmp_path):
    from accelbench.errors import ConfigError
    from accelbench.train.profiling import parse_profile_steps
    from accelbench.train.run import RunOptions, validate

    with pytest.raises(ConfigError, match="contradict"):
        validate(RunOptions(recompute="1", without=["selective-recompute"]))
    with pytest.raises(ConfigError):
        parse_profile_steps("3-", 20)
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot change a run being resumed"):
        validate(RunOptions(resume=str(tmp_path), without=["packing"]))


def test_back_off_replays_every_layer_before_halving_the_micro_batch():
    from types import SimpleNamespace

    from accelbench.train.recovery import back_off

    plan = {"LBS": 8, "GAS": 1, "GBS": 16, "gradient_checkpointing": True, "recompute": "auto",
            "recompute_layers": 0, "recompute_table": [[100, 0], [200, 1]], "adjustments": []}
    cfg = SimpleNamespace(case="tiny", plans={"finetune": plan})
    first = back_off(cfg, {"stage": "finetune", "step": 2, "error": "oom"}, {})
    assert [(a["what"], a["from"], a["to"]) for a in first] == [("recompute_layers", 0, 2)]
    assert plan["LBS"] == 8 and plan["recompute"] == "all" and plan["recompute_table"] == []
    second = back_off(cfg, {"stage": "finetune", "step": 2, "error": "oom"}, {})
    assert [(a["what"], a["from"], a["to"]) for a in second] == [("micro_batch", 8, 4), ("grad_accum", 1, 2)]
