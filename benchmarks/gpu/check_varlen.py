"""On CUDA: accelbench's varlen attention equals per-sample causal SDPA (forward and backward), bf16.

    python3 benchmarks/gpu/check_varlen.py
"""
import torch
import torch.nn.functional as F

from accelbench.train.varlen_attention import register, varlen_attention_forward


class Causal(torch.nn.Module):
    is_causal = True


def main() -> None:
    register()  # finds torch's varlen kernel
    torch.manual_seed(0)
    lens = [600, 37, 1500, 911]
    heads, dim = 32, 128
    total = sum(lens)
    q, k, v = (torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    out, _ = varlen_attention_forward(Causal(), q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref.append(F.scaled_dot_product_attention(q[:, :, s:e].float(), k[:, :, s:e].float(), v[:, :, s:e].float(),
                                                  is_causal=True, scale=dim**-0.5).transpose(1, 2))
    ref = torch.cat(ref, dim=1)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    grad = torch.randn_like(ref)
    g1 = torch.autograd.grad(out.float(), [q, k, v], grad)
    g2 = torch.autograd.grad(ref, [q, k, v], grad)
    gerr = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g1, g2))
    print(f"varlen vs per-sample sdpa: forward rel err {err:.2e}, backward rel err {gerr:.2e}")
    assert err < 2e-2 and gerr < 2e-2, "varlen attention disagrees with per-sample causal SDPA"


if __name__ == "__main__":
    main()
