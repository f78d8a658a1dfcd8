"""What one compiled decoder layer saves for its backward, per token, against the memory model's count.

The memory model plans how many decoder layers to replay from the bytes a kept layer saves
(``accelbench.memory.layer_saved_bytes_per_token``). This compiles one Llama decoder layer as the trainer does
(``train/kernels.compile_layers``, with and without lever "elementwise-recompute"), runs it forward on a packed
row through the trainer's varlen attention, and counts every tensor autograd saves (weights and the shared
rotary tables left out). It also counts the GEMM FLOPs of the backward, which must not grow: the lever may
recompute element-wise results and the attention, never a GEMM.

    PYTHONPATH=/tmp/site python3 benchmarks/gpu/layer_saves.py                     # GPU: 7B widths, 8192 tokens
    python benchmarks/gpu/layer_saves.py --hidden 256 --heads 4 --inter 688 --tokens 256 --samples 1  # CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from layer_numerics import add_layer_args, build_layer, packed_row  # noqa: E402

from accelbench.train import varlen_attention  # noqa: E402
from accelbench.train.kernels import compile_layers  # noqa: E402


def saved_per_token(layer: Any, rope: Any, row: dict[str, Any]) -> tuple[dict[str, int], float]:
    """({"dtype shape": bytes per token}, backward FLOPs per token) of one forward and backward of ``layer``."""
    x = row["x"].to(torch.bfloat16).clone().requires_grad_(True)
    cos, sin = (t.to(torch.bfloat16) for t in rope(x, row["pos"]))
    skip = {p.data_ptr() for p in layer.parameters()} | {cos.data_ptr(), sin.data_ptr()}
    saved: dict[int, tuple[str, int]] = {}  # by address: a tensor saved twice (or two views of it) counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in skip:
            kind = f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            saved.setdefault(t.data_ptr(), (kind, t.numel() * t.element_size()))
        return t

    # one sample: no packing kwargs, so the kernel runs SDPA, causal (the CPU varlen path loops over samples and
    # saves per-sample copies the GPU's single varlen kernel does not)
    packed = ({"cu_seq_lens_q": row["cu"], "cu_seq_lens_k": row["cu"], "max_length_q": row["max_len"],
               "max_length_k": row["max_len"]} if len(row["cu"]) > 2 else {})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_ids=row["pos"], position_embeddings=(cos, sin), **packed)
    out = out[0] if isinstance(out, tuple) else out
    flops = FlopCounterMode(display=False)
    with flops:
        out.backward(row["grad"].to(out.dtype))
    tokens = x.shape[1]
    by_kind: dict[str, int] = {}
    for kind, size in saved.values():
        by_kind[kind] = by_kind.get(kind, 0) + size // tokens
    return by_kind, flops.get_total_flops() / tokens


def measure(hidden: int, heads: int, inter: int, tokens: int, samples: int, elementwise_recompute: bool,
            device: str) -> dict[str, Any]:
    layer, rope = build_layer(hidden, heads, inter, varlen_attention.register(), seed=0)
    layer = layer.to(device, torch.bfloat16).train()
    rope = rope.to(device)
    compile_layers(types.SimpleNamespace(model=types.SimpleNamespace(
        language_model=types.SimpleNamespace(layers=[layer]))), "inductor", elementwise_recompute)
    row = packed_row(tokens, samples, hidden, device, seed=1)
    saved_per_token(layer, rope, packed_row(tokens // 2, samples, hidden, device, seed=2))  # compiles
    by_kind, flops = saved_per_token(layer, rope, row)
    return {"elementwise_recompute": elementwise_recompute, "saved_bytes_per_token": sum(by_kind.values()),
            "saved": by_kind, "backward_flops_per_token": flops}


def model_bytes_per_token(hidden: int, heads: int, inter: int, elementwise_recompute: bool) -> int:
    """The memory model's count for the same layer (finetune, bf16, compiled)."""
    from dataclasses import replace

    from accelbench.cases import get_preset
    from accelbench.memory import MemoryPlanInput, layer_saved_bytes_per_token

    preset = get_preset("tiny")
    llm = replace(preset.llm, hidden=hidden, heads=heads, kv_heads=heads, intermediate=inter)
    return layer_saved_bytes_per_token(MemoryPlanInput(
        preset=replace(preset, llm=llm), stage="finetune", zero_stage=3, dp_size=1, micro_batch=1, seq_len=2048,
        attn_impl="sdpa", kernels="inductor", elementwise_recompute=elementwise_recompute))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_layer_args(ap, samples=8)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for lever in (False, True):
        row = measure(args.hidden, args.heads, args.inter, args.tokens, args.samples, lever, device)
        row["model_bytes_per_token"] = model_bytes_per_token(args.hidden, args.heads, args.inter, lever)
        row["device"] = device
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
