"""How far each decoder-layer kernel set lands from a float32 reference, on one packed row.

The 20-step loss check on one H200 found accelbench's compiled plan off the peer after the loss spike while its
eager plan tracked it. This runs one Llama decoder layer (7B's widths) forward and backward on a packed row, with
the same weights and inputs each time:
- transformers' modules in float32: the reference (SDPA with a block-diagonal causal mask);
- the same in bf16, eager, with accelbench's varlen attention (what the peer runs);
- bf16 compiled as the "inductor" kernel set compiles it: kept, replayed, and without Inductor's eager rounding;
- bf16 with Liger's kernels (the eager plan; GPU only).
For the output, the input's gradient and each parameter's gradient it prints the relative error against the
reference (||x - ref|| / ||ref||) and the cosine. A kernel set that only rounds differently lands as far as bf16
eager does.

    PYTHONPATH=/tmp/site python3 benchmarks/gpu/layer_numerics.py            # GPU: 7B widths, 8192 tokens
    python benchmarks/gpu/layer_numerics.py --hidden 256 --inter 688 --tokens 512   # CPU: a small layer, no Liger
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from accelbench.train import varlen_attention  # noqa: E402


def build_layer(hidden: int, heads: int, inter: int, attn: str, seed: int) -> Any:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=1, max_position_embeddings=4096,
                      attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)


def packed_row(tokens: int, samples: int, hidden: int, device: str, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(tokens - 1, generator=g)[: samples - 1] + 1).values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])]).to(torch.int32)
    lens = (cu[1:] - cu[:-1]).tolist()
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    x = torch.randn(1, tokens, hidden, generator=g)
    grad = torch.randn(1, tokens, hidden, generator=g)
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return {"x": x.to(device), "grad": grad.to(device), "pos": pos.to(device), "cu": cu.to(device),
            "max_len": max(lens), "mask": mask[None, None].to(device)}


def run(layer: Any, rope: Any, row: dict[str, Any], dtype: torch.dtype, varlen: bool) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = row["x"].to(dtype).clone().requires_grad_(True)
    cos, sin = rope(x, row["pos"])
    kwargs: dict[str, Any] = ({"cu_seq_lens_q": row["cu"], "cu_seq_lens_k": row["cu"], "max_length_q": row["max_len"],
                               "max_length_k": row["max_len"]} if varlen else {"attention_mask": row["mask"]})
    out = layer(x, position_ids=row["pos"], position_embeddings=(cos, sin), **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(row["grad"].to(dtype))
    got = {"output": out.detach().float(), "input grad": x.grad.float()}
    got.update({n: p.grad.float() for n, p in layer.named_parameters()})
    return got


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    out = {}
    for name, r in ref.items():
        x, want = got[name].flatten().double(), r.flatten().double()
        out[name] = [float((x - want).norm() / want.norm()),
                     float(torch.nn.functional.cosine_similarity(x, want, dim=0))]
    return out


def add_layer_args(ap: argparse.ArgumentParser, samples: int) -> None:
    """One decoder layer's widths (7B's by default) and the packed row it runs on."""
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_args(ap, samples=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    varlen_name = varlen_attention.register()
    row = packed_row(args.tokens, args.samples, args.hidden, device, args.seed)

    ref_layer, rope = build_layer(args.hidden, args.heads, args.inter, "sdpa", args.seed)
    ref_layer, rope = ref_layer.to(device), rope.to(device)
    ref = run(ref_layer, rope, row, torch.float32, varlen=False)
    bf16 = copy.deepcopy(ref_layer).to(torch.bfloat16)
    bf16.self_attn.config._attn_implementation = varlen_name

    results: dict[str, Any] = {}
    results["bf16 eager (transformers)"] = compare(run(bf16, rope, row, torch.bfloat16, varlen=True), ref)
    for emulate, replayed in ((True, False), (True, True), (False, False)):
        layer = copy.deepcopy(bf16)
        forward = torch.compile(type(layer).forward, dynamic=True, options={"emulate_precision_casts": emulate})
        layer.forward = types.MethodType(forward, layer)
        if replayed:  # as the trainer's first decoder layers: activation checkpointing, the forward replayed
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                   use_reentrant=False)
        label = (f"bf16 compiled (inductor{', emulate_precision_casts' if emulate else ''}"
                 f"{', replayed' if replayed else ''})")
        results[label] = compare(run(layer, rope, row, torch.bfloat16, varlen=True), ref)
        torch._dynamo.reset()
    if device == "cuda":
        # Liger patches transformers' module classes and rotary function for every layer built afterwards
        from accelbench.train.kernels import apply_kernels

        apply_kernels("liger")
        liger, _ = build_layer(args.hidden, args.heads, args.inter, varlen_name, args.seed)
        liger = liger.to(device, torch.bfloat16)
        liger.load_state_dict(bf16.state_dict())
        results["bf16 eager (liger)"] = compare(run(liger, rope, row, torch.bfloat16, varlen=True), ref)

    names = list(ref)
    width = max(len(n) for n in names)
    for label, cmp in results.items():
        print(f"\n{label}: relative error against float32 (cosine)")
        for n in names:
            print(f"  {n:<{width}}  {cmp[n][0]:.3e}  ({cmp[n][1]:.6f})")
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "torch": torch.__version__, "args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
