"""The training objective without materialising logits for positions that are not targets.

LLaVA trains on captions (pretrain) and answers (finetune) only; every other position's logits are
discarded by the loss. This module computes the LLM's hidden states, keeps the target positions, and
runs lm_head + cross-entropy over them in chunks that are recomputed in backward, so fp32 logits
over the vocabulary never exist for more than one chunk.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

CHUNK_TOKENS = 4096


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def image_features(llava: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected features of ``pixel_values``' images, one row per image token (LlavaModel's own call)."""
    cfg = llava.config
    features = llava.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                              return_dict=True).pooler_output
    return torch.cat(list(features), dim=0)


def with_blank_image(llava: Any, embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` after running the vision tower and projector on one blank image with weight 0, as LLaVA does
    for a text-only sample: the same modules run as for an image batch, and the loss does not change."""
    size = llava.config.vision_config.image_size
    blank = torch.zeros(1, 3, size, size, dtype=embeds.dtype, device=embeds.device)
    return embeds + 0.0 * image_features(llava, blank).sum()


def lm_head_calls(max_tokens: int, chunk: int = CHUNK_TOKENS) -> int:
    """How many lm_head chunks a micro-batch of at most ``max_tokens`` tokens needs (at least one)."""
    return max(1, math.ceil(max_tokens / chunk))


def selected_cross_entropy(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                           chunk: int = CHUNK_TOKENS, calls: int | None = None,
                           num_items: torch.Tensor | None = None,
                           target_index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is a target (same value as HF's loss);
    with ``num_items``, the sum over them divided by that count instead (HF's ``num_items_in_batch``).

    ``calls``: run lm_head exactly this many times (some chunks may be empty).  Under ZeRO-3 every
    lm_head call gathers its weight with a collective, so all ranks must make the same number of
    calls whatever their target counts; None: as many ``chunk``-sized calls as the targets need.
    ``target_index``: those positions in ``hidden`` flattened over [B*T], found on the host
    (``data.host_positions``); without it a boolean mask finds them, and the host waits for the device.
    """
    labels = labels.to(hidden.device)
    if target_index is None:
        h, y = hidden[:, :-1], labels[:, 1:]
        keep = y != IGNORE_INDEX
        h, y = h[keep], y[keep]
    else:  # flat views, no copy of the hidden states: each target's label is the next position's
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        y = labels.reshape(-1).index_select(0, target_index + 1)
    n = y.numel()
    pieces = calls if calls is not None else max(1, math.ceil(n / chunk))
    # every piece, even an empty one, goes through lm_head: a batch without targets keeps its graph
    total = hidden.new_zeros((), dtype=torch.float32)
    for hs, ys in zip(torch.tensor_split(h, pieces), torch.tensor_split(y, pieces)):
        total = total + checkpoint(_chunk_loss_sum, lm_head, hs, ys, use_reentrant=False)
    return total / (num_items if num_items is not None else max(n, 1))


class LlavaObjective(torch.nn.Module):
    """Wraps LlavaForConditionalGeneration so ``engine(**batch)`` returns the loss directly.

    ``loss``: "objective" (logits at target positions only, chunked) or "hf" (transformers' own loss:
    fp32 logits at every position; the ablation baseline and what the HF Trainer runs).
    ``uniform_calls`` (ZeRO-3): every micro-batch calls the same modules the same number of times on
    every rank -- ``lm_head_calls`` chunks, and the vision tower even without images -- because ZeRO-3
    gathers each module's parameters with collectives as it is called; a rank that skips a call or
    makes an extra one leaves the others waiting forever.
    """

    def __init__(self, llava: Any, loss: str = "objective", *, uniform_calls: bool = False,
                 lm_head_calls: int | None = None):
        super().__init__()
        if loss not in ("objective", "hf"):
            raise ValueError(f"loss must be 'objective' or 'hf', got {loss!r}")
        self.llava, self.loss = llava, loss
        self.uniform_calls, self.lm_head_calls = uniform_calls, lm_head_calls

    @property
    def config(self) -> Any:
        return self.llava.config

    def input_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_index: torch.Tensor | None = None) -> torch.Tensor:
        """LlavaModel.forward's first half: token embeddings with the projected image features in place
        of the image tokens.  Done here so that both kinds of micro-batch call the same modules in the
        same order (ZeRO-3 prefetches by the recorded module order): with ``uniform_calls`` an image-less
        micro-batch runs the vision tower and projector on one blank image, with weight 0 in the loss.
        ``image_index``: the image tokens' positions in ``input_ids`` flattened, found on the host; the
        features are then copied in by index (LlavaModel's mask and ``masked_scatter`` make the host wait for
        the device to find them, in the forward and again in the backward)."""
        model = self.llava.model
        embeds = model.get_input_embeddings()(input_ids)
        if pixel_values is None and not self.uniform_calls:
            return embeds
        if pixel_values is None:
            return with_blank_image(self.llava, embeds)
        features = image_features(self.llava, pixel_values).to(embeds.device, embeds.dtype)
        if image_index is None:
            mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
            return embeds.masked_scatter(mask, features)
        if image_index.numel() != features.shape[0]:
            raise ValueError(f"{image_index.numel()} image tokens in the micro-batch but {features.shape[0]} image "
                             f"features: each image needs {self.config.image_seq_length} '<image>' tokens")
        return embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_index, features).reshape(embeds.shape)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                num_items: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
                target_index: torch.Tensor | None = None, **attention_kwargs: Any) -> torch.Tensor:
        """The loss: the mean over this micro-batch's targets, or with ``num_items`` their sum divided by it.
        ``image_index`` and ``target_index``: positions found on the host (``data.host_positions``)."""
        out = self.llava.model.language_model(inputs_embeds=self.input_embeds(input_ids, pixel_values, image_index),
                                              attention_mask=attention_mask, position_ids=position_ids,
                                              use_cache=False, **attention_kwargs)
        if self.loss == "hf":  # transformers' own: logits at every position, upcast to fp32 in its loss
            logits = self.llava.lm_head(out.last_hidden_state)
            return self.llava.loss_function(logits=logits, labels=labels, num_items_in_batch=num_items,
                                            vocab_size=self.llava.config.text_config.vocab_size)
        return selected_cross_entropy(self.llava.lm_head, out.last_hidden_state, labels,
                                      calls=self.lm_head_calls if self.uniform_calls else None, num_items=num_items,
                                      target_index=target_index)
