"""Fused kernel sets the trainer can switch on by name (a backend offers them in its capabilities).

"liger" replaces transformers' module classes, so it is applied before the model is built; "inductor"
compiles each built decoder layer's forward with torch.compile.
"""
from __future__ import annotations

import types
from typing import Any

from ..errors import ConfigError

KNOWN = ("hf", "liger", "inductor")


def apply_kernels(name: str) -> None:
    """Install kernel set ``name`` for Llama decoder layers in this process, before the model is built."""
    if name not in KNOWN:
        raise ConfigError(f"kernel set {name!r} is unknown to the trainer: the backend offered it, but only "
                          f"{', '.join(KNOWN)} can be applied (run with --without fused-kernels)")
    if name == "liger":
        # RMSNorm, SwiGLU and RoPE only: the loss is accelbench's target-only chunked objective
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def compile_layers(model: Any, name: str, elementwise_recompute: bool = False) -> int:
    """For kernel set "inductor": compile the forward of every LLM decoder layer; returns how many layers.

    ``elementwise_recompute`` (lever "elementwise-recompute"): the backward graph of a layer that keeps its
    activations recomputes every result that needs no GEMM (the RMSNorm outputs, the attention, SwiGLU's act·up)
    from what it saves (each RMSNorm's input and rstd, q, k, v, gate, up), instead of saving those results too:
    Inductor's partitioner with its ban list relaxed (``aggressive_recomputation``; GEMMs stay banned). A kept 7B
    layer then saves 35 % less, so fewer layers are replayed whole; on one H200 the recomputation cost about what
    the avoided replays saved (docs/performance.md).

    The forward, not the module call: module hooks (ZeRO-3's fetch and release, around the whole layer when it
    is a fetch unit) stay outside the graph. transformers' activation checkpointing is part of the decoder layer's
    forward, so it is traced into the graph, which then has a replayed and a kept variant. One compiled function
    serves every layer, with dynamic shapes, because a packed micro-batch has a different token count every step.

    The vision encoder layers stay eager. They run without autograd (``model.freeze_for_stage``), and compiled so
    Inductor fuses each layer with fp32 intermediates: image features 0.6 % (relative) off eager bf16's on CPU, and
    on one H200 the 7B finetune loss curve at micro-batch 8 left the peer's runs at step 9 in 3 of 3 runs
    (docs/performance-history.md); with eager rounding (``emulate_precision_casts``) too, three CLIP-L-wide layers
    still land 0.14 % from eager on CPU (LayerNorm's reductions differ). Eager, they give the peer's features bit for
    bit; each is still one ZeRO-3 fetch unit (``ds_config.COMPILED_LAYERS``), so the tower's host work is 24
    fetches, not one per module.
    """
    if name != "inductor":
        return 0
    import torch
    import torch._functorch.config as partitioner
    from torch._dynamo.utils import counters

    # each stage starts afresh: its own recompile budget (dynamo falls back to eager past it) and its own counts
    torch._dynamo.reset()
    counters.clear()
    partitioner.aggressive_recomputation = elementwise_recompute  # read when a graph is partitioned
    layers = model.model.language_model.layers
    # Inductor rounds to bf16 wherever eager does, not only at the ends of each fused kernel: with its default fp32
    # intermediates no gradient of a bf16 layer equals eager's; with this, on CPU, all do, bit for bit
    forward = torch.compile(type(layers[0]).forward, dynamic=True, options={"emulate_precision_casts": True})
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    return len(layers)


def linears_as_under_zero3_default(model: Any, zero3_config: dict[str, Any] | None) -> int:
    """Where ``zero3_config`` (a ZeRO-3 run's DeepSpeed config) sets ``memory_efficient_linear: false`` -- compiled
    layers need torch's own linear inside their graphs (``ds_config.COMPILED_LAYERS``) -- run the projector's
    linear layers through DeepSpeed's ZeRO-3 linear function, and the frozen vision tower's through the same
    arithmetic without the function's autograd wrapper; returns how many (0 elsewhere).

    By default ZeRO-3 replaces ``nn.functional.linear`` for the whole process with that function, and so it does in
    the peer and in LLaVA's own training. It adds the bias after the matmul, a second bf16 rounding, where torch's
    linear adds it inside the GEMM: a bias under half a unit of the last place then never moves an output. With
    random-init weights the biases start at zero, so the two agree until the projector's biases have trained. The
    decoder layers and lm_head have no bias, where both give the same bits.
    """
    if zero3_config is None or zero3_config.get("zero_optimization", {}).get("memory_efficient_linear", True):
        return 0  # no ZeRO-3, or ZeRO-3 replaces nn.functional.linear everywhere itself
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    import torch

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return zero3_linear_wrap(x, self.weight, self.bias)

    def frozen_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # the frozen tower runs without autograd: the same ops as LinearFunctionForZeroStage3.forward, without the
        # autograd.Function around them, whose Python took 0.13 ms a call on the host the tower's forward waits on
        if x.dim() == 2 and self.bias is not None:
            return torch.addmm(self.bias, x, self.weight.t())
        out = x.matmul(self.weight.t())
        return out if self.bias is None else out.add_(self.bias)

    linears = 0
    for part, method in ((model.model.vision_tower, frozen_forward), (model.model.multi_modal_projector, forward)):
        for m in part.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward, linears = types.MethodType(method, m), linears + 1
    return linears


def compile_counters() -> dict[str, int]:
    """What torch.compile did in this process since the stage compiled its layers: the graphs it made (a recompile
    makes another) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
