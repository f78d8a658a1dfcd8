"""Analytic FLOPs vs torch's FlopCounterMode on the tiny LLaVA (CPU, fp32, eager attention).

Eager attention is used because CPU SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
which FlopCounterMode has no formula for (it would silently count 0 attention FLOPs); eager runs
the same QKᵀ/AV as plain matmuls, so the count is complete.
"""
from __future__ import annotations

import pytest

from accelbench.cases import PRESETS
from accelbench.train.flops import (
    FlopBreakdown,
    flagperf_mfu,
    llm_layer_matmul_params,
    mfu,
    step_flops,
    vision_layers_executed,
)

TINY = PRESETS["tiny"]
IMAGE_TOKEN_ID = 1023
PAD_ID = 0
TEXT_LENS = (10, 30)  # text tokens after the image in each of the two sequences


# ---------------------------------------------------------------------------------------------
# Pure arithmetic
# ---------------------------------------------------------------------------------------------

def test_flagperf_mfu_reference_number():
    value = flagperf_mfu(13e9, "finetune", 249.93, 192e12)
    assert value == pytest.approx(0.10152, abs=2e-5)
    assert f"{value * 100:.2f} %" == "10.15 %"
    assert flagperf_mfu(13e9, "pretrain", 249.93, 192e12) == pytest.approx(value / 3)


def test_mfu_and_validation():
    assert mfu(96e12, 192e12) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)
    with pytest.raises(ValueError):
        flagperf_mfu(1.0, "sft", 1.0, 1.0)
    with pytest.raises(ValueError):
        step_flops(TINY, [20], 1, "sft", grad_ckpt=False)
    with pytest.raises(ValueError):
        step_flops(TINY, [20], 2, "finetune", grad_ckpt=False)  # 2 images need 32 tokens
    with pytest.raises(ValueError):
        step_flops(TINY, [20, 30], 1, "finetune", grad_ckpt=False, padded_len=25)


def test_terms_by_hand_tiny():
    # tiny: vision h=32 i=64 L=3 patch 14 on 56² -> 16 patches, 17 positions; LLM h=64 i=172 L=2 V=1024.
    s = 40
    # a model that pushes activation gradients through the frozen tower (transformers' Llava when checkpointing)
    fb = step_flops(TINY, [s], 1, "finetune", grad_ckpt=True, frozen_vision_backward=True)
    conv = 2 * (3 * 14 * 14) * 32 * 16
    vis_layer = 2 * (4 * 32 * 32 + 2 * 32 * 64) * 17 + 4 * 17 * 17 * 32
    assert fb.vision_fwd == conv + 3 * vis_layer
    p1, p2 = 32 * 64, 64 * 64
    assert fb.projector == 16 * (2 * (p1 + p2) + 2 * (p1 + p2) + 2 * p2)
    n_layer = 4 * 64 * 64 + 3 * 64 * 172
    assert llm_layer_matmul_params(TINY) == n_layer
    assert fb.llm_dense == 6 * 2 * n_layer * s
    assert fb.llm_attention == 3 * 2 * 4 * s * s * 64
    assert fb.lm_head == 6 * 1024 * 64 * s
    model = fb.vision_fwd + fb.projector + fb.llm_dense + fb.llm_attention + fb.lm_head
    assert fb.model_flops == model
    # Replay of both decoder layers minus down_proj (non-reentrant checkpoint's early stop) ...
    llm_recompute = 2 * (2 * (n_layer - 64 * 172) * s + 4 * s * s * 64)
    # ... plus the 2 CLIP layers feeding hidden_states[-2] (minus fc2), which gradients reach because
    # transformers hooks CLIP's patch embeddings to require grad.
    vis_dense = 4 * 32 * 32 + 2 * 32 * 64
    vis_attn = 4 * 17 * 17 * 32
    vis_recompute = 2 * (2 * (vis_dense - 32 * 64) * 17 + vis_attn)
    assert fb.recompute_flops == llm_recompute + vis_recompute
    vis_bwd = 2 * (2 * vis_dense * 17 + 2 * vis_attn) + 2 * p1 * 16  # + projector linear_1 input grad
    assert fb.frozen_vision_bwd_flops == vis_bwd
    assert fb.hardware_flops == model + fb.recompute_flops + vis_bwd
    assert fb.padding_flops == 0
    full = step_flops(TINY, [s], 1, "finetune", grad_ckpt=True, recompute_early_stop=False)
    assert full.recompute_flops == 2 * (2 * n_layer * s + 4 * s * s * 64)
    assert full.frozen_vision_bwd_flops == 0  # accelbench's model: the tower runs without autograd
    assert step_flops(TINY, [s], 1, "finetune", grad_ckpt=True).hardware_flops == model + llm_recompute
    assert set(fb.to_dict()) >= {"vision_fwd", "projector", "llm_dense", "llm_attention", "lm_head",
                                 "model_flops", "hardware_flops"}

    pre = step_flops(TINY, [s], 1, "pretrain", grad_ckpt=False)
    assert pre.llm_dense == 4 * 2 * n_layer * s  # fwd 2N + activation-grad 2N
    assert pre.lm_head == 4 * 1024 * 64 * s
    assert pre.llm_attention == fb.llm_attention  # attention backward is needed in both stages
    assert pre.hardware_flops == pre.model_flops
    assert pre.recompute_flops == pre.frozen_vision_bwd_flops == 0


def test_padding_only_changes_hardware_flops():
    real = step_flops(TINY, [26, 46], 2, "finetune", grad_ckpt=False)
    padded = step_flops(TINY, [26, 46], 2, "finetune", grad_ckpt=False, padded_len=46)
    rect = step_flops(TINY, [46, 46], 2, "finetune", grad_ckpt=False)
    assert padded.model_flops == real.model_flops
    assert padded.hardware_flops == rect.model_flops
    assert padded.padding_flops == rect.model_flops - real.model_flops > 0


def test_llava_13b_is_close_to_palm_formula():
    # Per token PaLM: 6N + 12·L·H·Q·T (finetune, N = LLM non-embedding params) -- our LLM terms must
    # match it up to biases/norms (vision and projector come on top).
    p = PRESETS["llava1.5-13b"]
    s = 2048
    fb = step_flops(p, [s], 1, "finetune", grad_ckpt=False)
    palm = 6 * p.llm.non_embedding_params * s + 12 * p.llm.layers * p.llm.hidden * s * s
    ours = fb.llm_dense + fb.llm_attention + fb.lm_head
    assert ours == pytest.approx(palm, rel=1e-3)
    assert vision_layers_executed(p) == 24


# ---------------------------------------------------------------------------------------------
# Against FlopCounterMode
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = TINY.llava_config(image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_ID)
    model = transformers.LlavaForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    assert model.config.image_seq_length == TINY.vision.image_tokens
    return model


def _batch(model, text_lens, pad_to=None):
    """One image at the start of each sequence, then random text; right-padded to ``pad_to``."""
    import torch

    n_img = model.config.image_seq_length
    lens = [n_img + t for t in text_lens]
    width = pad_to or max(lens)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.full((len(lens), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    for row, (n, t) in enumerate(zip(lens, text_lens)):
        input_ids[row, :n_img] = IMAGE_TOKEN_ID
        input_ids[row, n_img:n] = torch.randint(2, IMAGE_TOKEN_ID - 1, (t,), generator=gen)
        mask[row, :n] = 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == IMAGE_TOKEN_ID), -100)
    size = TINY.vision.image_size
    pixel_values = torch.randn(len(lens), 3, size, size, generator=gen)
    return lens, dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, labels=labels)


def _set_stage(model, stage: str) -> None:
    """accelbench's freezing: the stage's trainable modules, and the frozen tower run without autograd."""
    from accelbench.train.model import freeze_for_stage

    freeze_for_stage(model, stage)


def _set_ckpt(model, on: bool) -> None:
    if on:
        # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias).
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        # Enabling also installed enable_input_require_grads hooks, which disabling leaves behind;
        # they would make later runs push gradients through the frozen vision tower.
        model.disable_input_require_grads()


def _measure(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = model(**batch).loss
        loss.backward()
    return counter.get_total_flops()


def _check_grads(model, stage: str) -> None:
    llava = model.model
    assert all(p.grad is not None for p in llava.multi_modal_projector.parameters())
    assert all(p.grad is None for p in llava.vision_tower.parameters())
    llm_grads = [p.grad is not None for p in llava.language_model.layers.parameters()]
    assert all(llm_grads) if stage == "finetune" else not any(llm_grads)


# The analytic count reproduces FlopCounterMode op for op (measured: exact equality on transformers
# 5.24 / torch 2.13); 1 % leaves room for small ops a future version may add (the contract is 5 %).
REL = 0.01


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_matches_flop_counter_padded_batch(tiny_model, stage, ckpt):
    _set_stage(tiny_model, stage)
    _set_ckpt(tiny_model, ckpt)
    try:
        lens, batch = _batch(tiny_model, TEXT_LENS)
        measured = _measure(tiny_model, batch)
        _check_grads(tiny_model, stage)
    finally:
        _set_ckpt(tiny_model, False)
    fb = step_flops(TINY, lens, len(lens), stage, grad_ckpt=ckpt, padded_len=max(lens))
    assert fb.hardware_flops == pytest.approx(measured, rel=REL), fb.to_dict()
    if ckpt:  # the recompute must be visible in the measurement, not just inside the tolerance
        no_ckpt = step_flops(TINY, lens, len(lens), stage, grad_ckpt=False, padded_len=max(lens))
        assert measured > no_ckpt.hardware_flops + 0.5 * fb.recompute_flops


def test_reentrant_style_full_replay(tiny_model):
    """Without checkpoint early stop every matmul of a checkpointed layer is replayed."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    _set_stage(tiny_model, "finetune")
    _set_ckpt(tiny_model, True)
    try:
        lens, batch = _batch(tiny_model, TEXT_LENS)
        with set_checkpoint_early_stop(False):
            measured = _measure(tiny_model, batch)
    finally:
        _set_ckpt(tiny_model, False)
    fb = step_flops(TINY, lens, len(lens), "finetune", grad_ckpt=True, padded_len=max(lens),
                    recompute_early_stop=False)
    assert fb.hardware_flops == pytest.approx(measured, rel=REL), fb.to_dict()


def test_gradients_through_the_frozen_tower(tiny_model):
    """transformers' own Llava under enable_input_require_grads (what activation checkpointing calls) pushes
    activation gradients through the frozen CLIP tower: ``frozen_vision_backward=True`` counts them. accelbench's
    model runs the tower without autograd, so the same hooks add nothing there."""
    import torch

    _set_stage(tiny_model, "pretrain")
    tiny_model.enable_input_require_grads()
    vision = tiny_model.model.vision_tower
    try:
        lens, batch = _batch(tiny_model, TEXT_LENS)
        ours = _measure(tiny_model, batch)
        grads = [p.grad.clone() for p in tiny_model.model.multi_modal_projector.parameters()]
        del vision.forward  # back to transformers' own forward
        transformers_own = _measure(tiny_model, batch)
        # the same gradients: nothing trained lies upstream of the projector
        for p, g in zip(tiny_model.model.multi_modal_projector.parameters(), grads, strict=True):
            assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)
    finally:
        tiny_model.disable_input_require_grads()
        _set_stage(tiny_model, "pretrain")
    fb = step_flops(TINY, lens, len(lens), "pretrain", grad_ckpt=False, padded_len=max(lens),
                    frozen_vision_backward=True)
    assert fb.recompute_flops == 0 and fb.frozen_vision_bwd_flops > 0
    assert fb.hardware_flops == pytest.approx(transformers_own, rel=REL), fb.to_dict()
    ours_fb = step_flops(TINY, lens, len(lens), "pretrain", grad_ckpt=False, padded_len=max(lens))
    assert ours_fb.hardware_flops == pytest.approx(ours, rel=REL)
    assert transformers_own - ours == pytest.approx(fb.frozen_vision_bwd_flops, rel=REL)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_model_flops_match_unpadded_sequences(tiny_model, stage):
    _set_stage(tiny_model, stage)
    measured, lens = 0, []
    for t in TEXT_LENS:  # batch 1 each: no padding, so the hardware ran exactly the real lengths
        (n,), batch = _batch(tiny_model, (t,))
        measured += _measure(tiny_model, batch)
        lens.append(n)
    fb = step_flops(TINY, lens, len(lens), stage, grad_ckpt=False)
    assert fb.model_flops == fb.hardware_flops
    assert fb.model_flops == pytest.approx(measured, rel=REL), fb.to_dict()


def test_all_clip_layers_run(tiny_model):
    """transformers 5.24 runs every CLIP encoder layer although LLaVA reads hidden_states[-2]."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    _, batch = _batch(tiny_model, (4,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tiny_model.model.get_image_features(batch["pixel_values"])
    per_module = counter.get_flop_counts()
    layers_run = [name for name in per_module if name.rsplit(".", 1)[-1].isdigit() and ".encoder.layers." in name]
    assert len(layers_run) == vision_layers_executed(TINY) == TINY.vision.layers
    vision_total = sum(per_module[name].get(op, 0) for name in per_module if name.endswith("CLIPVisionModel")
                       for op in per_module[name])
    analytic = step_flops(TINY, [TINY.vision.image_tokens], 1, "finetune", grad_ckpt=False).vision_fwd
    assert vision_total == pytest.approx(analytic, rel=0.01)
