"""bf16 GEMM speed of one decoder layer's matmuls on this GPU, alone (no NCCL, no other kernel beside them): the
ceiling that the GEMM part of a training step runs against.
    python3 benchmarks/gpu/gemm_tflops.py [--case llava1.5-13b] [--tokens 12288 20996] [--iters 20]
For each of the layer's weights (q, k, v, o, gate, up, down: LLaMA's shapes from accelbench's case presets) it
times the three GEMMs autograd runs for a linear layer over T packed tokens:
    forward  Y = X @ W.T        (T x in) by (in x out)
    dX       dY @ W             (T x out) by (out x in)
    dW       dY.T @ X           (out x T) by (T x in)
and prints one JSON line per token count: TFLOP/s of each kind, and of the whole layer (its FLOPs over the sum of
the times), which is the rate a step's GEMMs would reach if they ran like this."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's accelbench, without installing it
from accelbench.cases import PRESETS  # noqa: E402


def cuda_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def layer_weights(case: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear in one LLaMA decoder layer."""
    t = PRESETS[case].llm
    h, i, kv = t.hidden, t.intermediate, t.kv_heads * t.head_dim
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def measure(case: str, tokens: int, iters: int) -> dict:
    times = {"forward": 0.0, "dX": 0.0, "dW": 0.0}
    flops_each = 0.0
    for out_f, in_f in layer_weights(case).values():
        x = torch.randn(tokens, in_f, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(tokens, out_f, dtype=torch.bfloat16, device="cuda")
        times["forward"] += cuda_ms(lambda: torch.nn.functional.linear(x, w), iters)
        times["dX"] += cuda_ms(lambda: dy.mm(w), iters)
        times["dW"] += cuda_ms(lambda: dy.t().mm(x), iters)
        flops_each += 2.0 * tokens * in_f * out_f
    tflops = {k: round(flops_each / (ms * 1e-3) / 1e12, 1) for k, ms in times.items()}
    total_ms = sum(times.values())
    return {"case": case, "tokens": tokens, "device": torch.cuda.get_device_name(),
            "layer_ms": {k: round(v, 3) for k, v in times.items()}, "tflops": tflops,
            "layer_tflops": round(3 * flops_each / (total_ms * 1e-3) / 1e12, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", nargs="+", default=["llava1.5-13b", "llava1.5-7b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[12288, 20996],
                   help="packed tokens per micro-batch (13B finetune: about 12.3k a step on average, 21k at most)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    for case in a.case:
        for tokens in a.tokens:
            print(json.dumps(measure(case, tokens, a.iters)), flush=True)


if __name__ == "__main__":
    main()
