"""A varlen attention implementation for transformers, registered through its AttentionInterface.

Packed rows carry ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers' flash-attention kwargs).
On CUDA this calls torch's flash varlen kernel (``torch.nn.attention.varlen.varlen_attn``); elsewhere it
runs SDPA per sample (correct, for CPU and tests). Without those kwargs (e.g. the CLIP tower) it is SDPA.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "accelbench_varlen"
# torch's flash varlen kernel and its causal keyword, found once in ``register`` so that a torch.compile'd
# decoder layer traces no import or signature inspection (each would break the graph)
_VARLEN: Any = None
_VARLEN_CAUSAL: dict[str, Any] = {}


def _causal_kwargs(fn: Any) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}  # flash's convention for causal


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    cu = kwargs.get("cu_seq_lens_q")
    # packed decoder rows only: the vision tower (non-causal) receives the same kwargs through Llava
    if cu is None or not getattr(module, "is_causal", False) or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # [1, heads, T, dim] -> [T, heads, dim]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    if q.is_cuda:
        if _VARLEN is None:
            raise RuntimeError("torch.nn.attention.varlen is not importable here, or register() was not called")
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        extra = {"enable_gqa": True} if groups > 1 else {}
        out = _VARLEN(q, k, v, cu.to(q.device), cu.to(q.device), max_len, max_len, scale=scaling,
                      **_VARLEN_CAUSAL, **extra)
    else:
        bounds = cu.tolist()
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        parts = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)[0].transpose(0, 1))
        out = torch.cat(parts)
    return out.unsqueeze(0), None  # [1, T, heads, dim], as transformers' attention functions return


def register() -> str:
    """Make ``attn_implementation="accelbench_varlen"`` available to transformers models."""
    global _VARLEN, _VARLEN_CAUSAL
    from transformers import AttentionInterface

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch: CUDA batches then need flash_attn's implementation instead
        pass
    else:
        _VARLEN, _VARLEN_CAUSAL = varlen_attn, _causal_kwargs(varlen_attn)
    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME
