"""The training objective without materialising logits for positions that are not targets.

LLaVA trains on captions (pretrain) and answers (finetune) only; every other position's logits are
discarded by the loss. This module computes the LLM's hidden states, keeps the target positions, and
runs lm_head + cross-entropy over them in chunks that are recomputed in backward, so fp32 logits
over the vocabulary never exist for more than one chunk.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

CHUNK_TOKENS = 4096


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def selected_cross_entropy(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                           chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is a target (same value as HF's loss)."""
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0  # keeps the graph (and ZeRO's hooks) intact on a batch without targets
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        total = total + checkpoint(_chunk_loss_sum, lm_head, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
    return total / n


class LlavaObjective(torch.nn.Module):
    """Wraps LlavaForConditionalGeneration so ``engine(**batch)`` returns the loss directly.

    ``loss``: "objective" (logits at target positions only, chunked) or "hf" (transformers' own loss:
    fp32 logits at every position; the ablation baseline and what the HF Trainer runs).
    """

    def __init__(self, llava: Any, loss: str = "objective"):
        super().__init__()
        if loss not in ("objective", "hf"):
            raise ValueError(f"loss must be 'objective' or 'hf', got {loss!r}")
        self.llava, self.loss = llava, loss

    @property
    def config(self) -> Any:
        return self.llava.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **attention_kwargs: Any) -> torch.Tensor:
        if self.loss == "hf":
            return self.llava(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              position_ids=position_ids, labels=labels, use_cache=False, **attention_kwargs).loss
        out = self.llava.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False, **attention_kwargs)
        return selected_cross_entropy(self.llava.lm_head, out.last_hidden_state, labels)
