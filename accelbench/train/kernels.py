"""Fused kernel sets the trainer can switch on by name (a backend offers them in its capabilities).

"liger" replaces transformers' module classes, so it is applied before the model is built; "inductor"
compiles each built decoder layer's (and vision encoder layer's) forward with torch.compile.
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


def compile_layers(model: Any, name: str) -> int:
    """For kernel set "inductor": compile the forward of every LLM decoder layer and every vision encoder layer;
    returns how many layers.

    The forward, not the module call: module hooks (ZeRO-3's fetch and release, around the whole layer when it
    is a fetch unit) stay outside the graph. transformers' activation checkpointing is part of the decoder layer's
    forward, so it is traced into the graph, which then has a replayed and a kept variant. One compiled function
    serves every layer of a kind, with dynamic shapes, because a packed micro-batch has a different token count
    every step, and a different number of images (one image, or a text-only micro-batch's blank one, compiles once
    more: torch.compile treats a size of 1 apart). The vision tower is frozen and small (a few ms of kernels a
    step), but eager, under ZeRO-3, its host work (a fetch and a release around each of its ~200 modules) kept the
    device idle for longer than its kernels run.
    """
    if name != "inductor":
        return 0
    import torch
    from torch._dynamo.utils import counters

    # each stage starts afresh: its own recompile budget (dynamo falls back to eager past it) and its own counts
    torch._dynamo.reset()
    counters.clear()
    vision = model.model.vision_tower
    vision = getattr(vision, "vision_model", vision)  # CLIPVisionModel holds its encoder directly in transformers 5
    stacks = (model.model.language_model.layers, vision.encoder.layers)
    for layers in stacks:
        forward = torch.compile(type(layers[0]).forward, dynamic=True)
        for layer in layers:
            layer.forward = types.MethodType(forward, layer)
    return sum(len(layers) for layers in stacks)


def compile_counters() -> dict[str, int]:
    """What torch.compile did in this process since the stage compiled its layers: the graphs it made (a recompile
    makes another) and graph breaks."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
