"""No padding: pack a micro-batch's samples into one row, with attention kept inside each sample.

The micro-batch keeps its samples (LBS and GBS mean what they meant); only the pad tokens go.
Positions restart at 0 for each sample, and ``cu_seq_lens`` tells the varlen attention kernel where
samples begin, so no token attends across a sample boundary.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import IGNORE_INDEX, host_positions


def collate_packed(samples: Sequence[dict[str, Any]], pad_token_id: int,
                   image_token_id: int | None = None) -> dict[str, Any]:
    """Like ``data.collate`` but one packed row: input_ids/labels/position_ids are [1, sum(lengths)]."""
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    seq_lens = [int(s["input_ids"].numel()) for s in samples]
    input_ids = torch.cat([s["input_ids"] for s in samples]).unsqueeze(0)
    labels = torch.cat([s["labels"] for s in samples]).clone()
    starts = torch.tensor([0] + seq_lens[:-1]).cumsum(0)
    labels[starts] = IGNORE_INDEX  # the first token is never a target: no prediction across a boundary
    position_ids = torch.cat([torch.arange(n) for n in seq_lens]).unsqueeze(0)
    cu = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    total = sum(seq_lens)
    labels = labels.unsqueeze(0)
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "attention_mask": None, "pixel_values": torch.stack(images) if images else None,
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(seq_lens), "max_length_k": max(seq_lens),
        "ids": [s["id"] for s in samples], "seq_lens": seq_lens, "real_tokens": total, "padded_tokens": total,
        **(host_positions(input_ids, labels, image_token_id) if image_token_id is not None else {}),
    }
