"""Does Liger's fused kernel set (RMSNorm, SwiGLU, RoPE) work with this transformers, and does it pay?

Run on the GPU machine (exit 1 if the kernels are unusable there, so the suite can fall back):
    PYTHONPATH=/tmp/site python3 benchmarks/gpu/check_liger.py
A 4-layer Llama with 13B's widths runs forward + backward on one packed row, once with transformers'
modules and once with the same weights after ``accelbench.train.kernels.apply_kernels("liger")``; it
prints the loss and gradient differences and the time per step of each.
"""
from __future__ import annotations

import sys
import time

import torch


def build(seed: int = 0):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def step(model, ids, pos):  # noqa: ANN001, ANN201
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    return loss.detach().float()


def timed(model, ids, pos, n: int = 10) -> float:  # noqa: ANN001
    for _ in range(3):
        step(model, ids, pos)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(model, ids, pos)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> int:
    from accelbench.train.kernels import apply_kernels

    tokens = 8192
    ids = torch.randint(0, 32000, (1, tokens), device="cuda")
    pos = torch.cat([torch.arange(n, device="cuda") for n in (3000, 2500, 2692)]).unsqueeze(0)  # packed samples
    ref = build()
    loss_ref = step(ref, ids, pos)
    grads_ref = {k: p.grad.float().clone() for k, p in ref.named_parameters()}
    t_ref = timed(ref, ids, pos)
    state = ref.state_dict()
    del ref
    try:
        apply_kernels("liger")
        fused = build()
        fused.load_state_dict(state)
        names = {type(m).__name__ for m in fused.modules()}
        if not {"LigerRMSNorm", "LigerSwiGLUMLP"} <= names:
            raise RuntimeError(f"Liger modules not in the model: {sorted(names)}")
        loss_fused = step(fused, ids, pos)
    except Exception as exc:  # the suite falls back to transformers' modules
        print(f"liger unusable here: {type(exc).__name__}: {exc}")
        return 1
    diffs = {k: ((p.grad.float() - grads_ref[k]).norm() / grads_ref[k].norm().clamp_min(1e-12)).item()
             for k, p in fused.named_parameters()}
    worst_name = max(diffs, key=diffs.get)
    worst = diffs[worst_name]
    t_fused = timed(fused, ids, pos)
    print(f"liger vs transformers: loss {loss_fused.item():.5f} vs {loss_ref.item():.5f}; worst grad rel diff "
          f"{worst:.2e} ({worst_name}); step {t_fused * 1e3:.1f} ms vs {t_ref * 1e3:.1f} ms "
          f"(speed-up {t_ref / t_fused:.3f}x)")
    # bf16: both sides round differently (Liger accumulates the norm-weight gradients in fp32, transformers
    # in bf16), so gradients are compared loosely; a wrong kernel is off by O(1), not by a few per cent
    return 0 if abs(loss_fused.item() - loss_ref.item()) < 1e-2 and worst < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
