"""deepspeed_config: LLaVA's zero2/zero3.json with "auto" resolved, accepted by DeepSpeed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from accelbench.train.ds_config import deepspeed_config, load_overrides

ROOT = Path(__file__).resolve().parents[1]


class _DataParallelOnly:
    """Minimal mpu: DeepSpeedConfig asks it for the data-parallel world size (no dist init needed)."""

    def __init__(self, world_size: int) -> None:
        self._world = world_size

    def get_data_parallel_world_size(self) -> int:
        return self._world


def _no_auto(obj) -> bool:
    if isinstance(obj, dict):
        return all(_no_auto(v) for v in obj.values())
    return obj != "auto"


def test_zero2_values():
    cfg = deepspeed_config(zero_stage=2, micro_batch=16, grad_accum=2, world_size=8, dtype="bf16",
                           hidden_size=4096)
    z = cfg["zero_optimization"]
    assert z == {
        "stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
        "allgather_bucket_size": 500_000_000, "reduce_bucket_size": 500_000_000,
    }
    assert isinstance(z["allgather_bucket_size"], int) and isinstance(z["reduce_bucket_size"], int)
    assert cfg["train_batch_size"] == 16 * 2 * 8
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["steps_per_print"] >= 10**9
    assert _no_auto(cfg)
    json.dumps(cfg)  # must be serialisable as a config file


def test_zero3_values_resolve_auto_like_hf():
    h = 5120
    cfg = deepspeed_config(zero_stage=3, micro_batch=4, grad_accum=1, world_size=16, dtype="bf16",
                           hidden_size=h, grad_clip=0.5)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    assert z["sub_group_size"] == 1_000_000_000
    assert z["reduce_bucket_size"] == 26_214_400  # 5120²
    assert z["stage3_prefetch_bucket_size"] == 23_592_960  # int(0.9 · 5120²)
    assert z["stage3_param_persistence_threshold"] == 51_200  # 10 · 5120
    assert z["stage3_max_live_parameters"] == 1_000_000_000
    assert z["stage3_max_reuse_distance"] == 1_000_000_000
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 0.5
    assert all(isinstance(v, (int, bool)) for v in z.values())


@pytest.mark.parametrize("dtype,bf16,fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)])
def test_dtype_flags(dtype, bf16, fp16):
    cfg = deepspeed_config(zero_stage=2, micro_batch=1, grad_accum=1, world_size=1, dtype=dtype, hidden_size=64)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16


def test_overrides_deep_merge_and_do_not_leak():
    base = deepspeed_config(zero_stage=3, micro_batch=1, grad_accum=1, world_size=2, dtype="bf16", hidden_size=64)
    cfg = deepspeed_config(zero_stage=3, micro_batch=1, grad_accum=1, world_size=2, dtype="bf16", hidden_size=64,
                           overrides={"zero_optimization": {"overlap_comm": False}, "steps_per_print": 10})
    assert cfg["zero_optimization"]["overlap_comm"] is False
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64  # sibling keys survive
    assert cfg["steps_per_print"] == 10
    assert base["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("kwargs", [
    {"zero_stage": 1}, {"dtype": "int8"}, {"micro_batch": 0}, {"world_size": 0},
])
def test_rejects_bad_arguments(kwargs):
    args = dict(zero_stage=2, micro_batch=1, grad_accum=1, world_size=1, dtype="bf16", hidden_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError):
        deepspeed_config(**args)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_accepted_by_deepspeed(stage, dtype, monkeypatch):
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig asks deepspeed.comm for the rank before consulting the mpu; without an initialised
    # process group it silently falls back to world_size 1, which would defeat the batch-size check.
    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)

    world = 4
    cfg = deepspeed_config(zero_stage=stage, micro_batch=3, grad_accum=2, world_size=world, dtype=dtype,
                           hidden_size=4096)
    ds = DeepSpeedConfig(cfg, mpu=_DataParallelOnly(world))
    assert ds.zero_optimization_stage == stage
    assert ds.train_batch_size == 24
    assert ds.train_micro_batch_size_per_gpu == 3
    assert ds.gradient_accumulation_steps == 2
    assert ds.gradient_clipping == 1.0
    assert ds.bfloat16_config.enabled is (dtype == "bf16")
    assert ds.float16_config.enabled is (dtype == "fp16")
    assert ds.zero_allow_untested_optimizer is True
    assert ds.zero_config.reduce_bucket_size == cfg["zero_optimization"]["reduce_bucket_size"]
    if stage == 3:
        assert ds.zero_config.prefetch_bucket_size == int(0.9 * 4096 * 4096)
        assert ds.zero_config.param_persistence_threshold == 40960
        assert ds.zero_config.max_live_parameters == 1_000_000_000
        assert ds.zero_config.gather_16bit_weights_on_model_save is True
    else:
        assert ds.zero_config.allgather_bucket_size == 500_000_000
        assert ds.zero_config.reduce_scatter is True


def test_zero3_buckets_lever_and_user_overrides_reach_the_plan_and_memory_model(tmp_path):
    from accelbench.backends import load_registry
    from accelbench.errors import ConfigError
    from accelbench.machine import describe_machine
    from accelbench.plan import BUCKETS_NOTE, build_plan, estimate, fit_recompute

    user = tmp_path / "tuned.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 200_000_000,
                                                      "stage3_param_persistence_threshold": 1_000_000}}))
    # 138 GiB: where 13B finetune's 5e8 buckets just miss at 16 x 2048 tokens with every layer replayed
    reg = load_registry(machine=describe_machine("NVIDIA H200", 138 * 2**30, count=1))
    args = dict(case="llava1.5-13b", stage="finetune", nproc=2)
    nvidia = reg.select("nvidia")
    llava = build_plan(nvidia, **args, without=("zero3-buckets", "whole-tower"))
    tuned = build_plan(nvidia, **args)
    mine = build_plan(nvidia, **args, ds_overrides=load_overrides(str(user)))
    # with every sample at 2048 tokens (before the data is known) 16 x 2048 tokens leave no room for the buckets;
    # at the data's bound they fit, and the re-fit takes them
    assert not tuned.zero3_buckets and any(n.startswith(BUCKETS_NOTE) for n in tuned.notes)
    for plan in (llava, tuned, mine):
        fit_recompute(plan, nvidia, micro_batch_tokens=21_000)
    assert llava.deepspeed_overrides() == {} and not llava.zero3_buckets
    assert tuned.zero3_buckets and not any(n.startswith(BUCKETS_NOTE) for n in tuned.notes)
    assert tuned.to_dict()["ds_overrides"] == {"zero_optimization": {
        "stage3_prefetch_bucket_size": 500_000_000, "reduce_bucket_size": 500_000_000,
        "stage3_param_persistence_threshold": 1024 * 4096}}  # lever whole-tower: CLIP's MLP weight
    assert [a.what for a in tuned.adjustments].count("zero3_buckets") == 1
    # the user's file wins over the lever, key by key
    assert mine.to_dict()["ds_overrides"]["zero_optimization"] == {
        "stage3_prefetch_bucket_size": 500_000_000, "reduce_bucket_size": 200_000_000,
        "stage3_param_persistence_threshold": 1_000_000}
    assert tuned.whole_tower and not llava.whole_tower and tuned.to_dict()["whole_tower"]
    # ZeRO-2 (pretrain) keeps LLaVA's zero2.json: every parameter is whole there anyway
    pretrain = build_plan(nvidia, case="llava1.5-13b", stage="pretrain", nproc=2)
    assert not pretrain.zero3_buckets and not pretrain.whole_tower
    # a bigger reduce bucket costs memory, and the estimate sees it
    assert estimate(tuned).terms["reduce_bucket"] - estimate(llava).terms["reduce_bucket"] == \
        (500_000_000 - 5120 * 5120) * 2
    # decoder layers as ZeRO-3 fetch units (benchmarks/gpu/ds/zero3-leaf.json) hand a whole layer's gradients
    # over at once: the estimate holds one layer's, not lm_head's alone
    leaf = build_plan(nvidia, **args, ds_overrides=load_overrides(str(ROOT / "benchmarks/gpu/ds/zero3-leaf.json")))
    fit_recompute(leaf, nvidia, micro_batch_tokens=21_000)
    layer = leaf.preset.llm.layer_params
    assert layer > 32000 * 5120
    assert estimate(leaf).terms["largest_param_grad"] == layer * 2
    assert estimate(tuned).terms["largest_param_grad"] == 32000 * 5120 * 2
    qualified = build_plan(nvidia, **args, ds_overrides={"zero_optimization": {"leaf_module": {
        "classes": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]}}})
    fit_recompute(qualified, nvidia, micro_batch_tokens=21_000)
    assert estimate(qualified).terms["largest_param_grad"] == layer * 2

    for text, needle in (("{not json", "is not valid JSON"), ("[1]", "must hold a JSON object"),
                         ('{"train_micro_batch_size_per_gpu": 4}', "set by --mbs"),
                         ('{"zero_optimization": {"stage": 2}}', "set by --zero-stage")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            load_overrides(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_overrides(str(tmp_path / "missing.json"))


def test_every_benchmark_ds_file_loads_and_names_classes_the_model_has():
    """The A/B files of benchmarks/gpu/ds/ pass --ds-config's checks, and each ZeRO-3 fetch-unit class they name is
    a module class of the LLaVA model (DeepSpeed would refuse a misspelt one only on the GPU machine)."""
    import torch

    from accelbench.cases import get_preset
    from accelbench.train.model import build_model

    model = build_model(get_preset("tiny"), image_token_id=1000, pad_token_id=0, dtype="fp32",
                        attn_implementation="sdpa", device=torch.device("cpu"))
    classes = {type(m).__name__ for m in model.modules()}
    files = sorted((ROOT / "benchmarks/gpu/ds").glob("*.json"))
    assert files
    for path in files:
        zero = load_overrides(str(path)).get("zero_optimization", {})
        for name in (zero.get("leaf_module") or {}).get("classes", []):
            assert name.rsplit(".", 1)[-1] in classes, (path.name, name)
