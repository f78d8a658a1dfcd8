"""ZeRO-3's optimizer step in fewer passes over memory and without a host sync (lever "lean-step").

DeepSpeed's stage-3 step makes, for every trainable parameter, a float32 copy of its bf16 gradient to take that
gradient's norm; it then concatenates each sub-group's gradients, casts the result to float32, multiplies it by
the clip factor in a pass of its own, and runs AdamW. In between it asks the host whether the norm is finite,
which waits for the device, and the kernels after it start from an empty queue. On one H200 (7B finetune) that
step took 0.164 s on the device (first to last kernel) and had 0.042 s of idle time, of a 1.200 s step; this
one, 0.098 and 0.031 s (docs/performance-history.md).

This step computes the same update with
  * one norm kernel per sub-group, over its gradients as they lie in ZeRO-3's flat partition buffer (bf16 read,
    float32 sums), instead of a float32 copy and a norm per parameter;
  * that buffer's slice cast to float32 once, with no concatenation before it;
  * the clip factor and the non-finite check handed to torch's fused AdamW as ``grad_scale`` and ``found_inf``
    (the way torch's GradScaler drives it): the kernel divides each gradient by the factor as it reads it, and
    skips the update on the device when the norm is not finite;
  * one host sync, at the end, once every kernel is queued, to tell the engine whether the step was skipped (it
    then leaves the LR schedule alone, as after DeepSpeed's own step);
  * the parameters still gathered after the backward released once the update is queued, not before it: that is
    Python over every parameter (26-43 ms a step for 7B on one H200), which left the device idle, since the
    backward ends in a sync; now the device runs the update meanwhile. Releasing a gathered parameter frees its
    whole copy and keeps its partition, which the update wrote, so the order changes no number.
It differs from DeepSpeed's step only in rounding: the norm sums in another order, and the gradient is divided by
the clip factor instead of multiplied by its reciprocal (tests/test_lean_step.py).
"""
from __future__ import annotations

import math
import types
from typing import Any

import torch

# What the step reads of DeepSpeed's stage-3 optimizer (deepspeed/runtime/zero/stage3.py)
_NEEDS = ("fp16_groups", "averaged_gradients", "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer",
          "dp_process_group", "clip_grad", "loss_scale", "_pre_step", "_partition_all_parameters", "_optimizer_step",
          "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group", "_post_step", "zero_grad")


def blocker(zero_optimizer: Any) -> str | None:
    """Why the lean step cannot stand in for this optimizer's step; None when it can."""
    missing = [name for name in _NEEDS if not hasattr(zero_optimizer, name)]
    if missing:
        return f"not DeepSpeed's ZeRO-3 optimizer as this step knows it (no {', '.join(missing)})"
    if getattr(zero_optimizer, "offload_optimizer", False) or getattr(zero_optimizer, "swap_optimizer", False):
        return "the optimizer states are offloaded: DeepSpeed's step moves them"
    if getattr(zero_optimizer, "use_muon", False) or getattr(zero_optimizer, "zenflow", False):
        return "Muon or ZenFlow updates are DeepSpeed's own"
    if getattr(zero_optimizer, "torch_autocast_gradscaler", None) is not None:
        return "torch autocast's grad scaler drives the step"
    if getattr(zero_optimizer, "dtype", None) == torch.float16 or float(zero_optimizer.loss_scale) != 1.0:
        return "fp16 loss scaling: DeepSpeed's step updates the scale"
    basic = getattr(zero_optimizer, "optimizer", None)
    if not isinstance(basic, torch.optim.Adam | torch.optim.AdamW) or not all(
            g.get("fused") for g in basic.param_groups):
        return "the base optimizer is not torch's fused Adam/AdamW, which takes the clip factor and the skip flag"
    return None


def install(engine: Any) -> str | None:
    """Give ``engine``'s ZeRO-3 optimizer the lean step; returns why not, leaving DeepSpeed's step, if it cannot."""
    zero_optimizer = engine.optimizer
    reason = blocker(zero_optimizer)
    if reason is None:
        zero_optimizer.step = types.MethodType(lean_step, zero_optimizer)
    return reason


def flat_gradient(zero_optimizer: Any, sub_group: int) -> torch.Tensor:
    """The sub-group's gradient partitions as one 1-D tensor: a slice of ZeRO-3's flat buffer where they lie in
    it back to back (the usual case), else DeepSpeed's own concatenation of them."""
    grads = zero_optimizer.averaged_gradients[sub_group]
    buffer = zero_optimizer.grad_partitions_flat_buffer
    size = buffer.element_size()
    start = (grads[0].data_ptr() - buffer.data_ptr()) // size
    offset = start
    for g in grads:
        if not (g.is_contiguous() and g.dtype == buffer.dtype and g.device == buffer.device
                and g.data_ptr() == buffer.data_ptr() + offset * size and offset + g.numel() <= buffer.numel()):
            return zero_optimizer.flatten(grads)
        offset += g.numel()
    return buffer.narrow(0, start, offset - start)


@torch.no_grad()
def lean_step(self: Any, closure: Any = None) -> None:
    """``DeepSpeedZeroOptimizer_Stage3.step`` for bf16/fp32 without offload (see the module's docstring)."""
    import deepspeed.comm as dist

    self._pre_step()
    self.overflow = False
    groups = range(len(self.fp16_groups))
    grads = [flat_gradient(self, i) for i in groups]
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
    dist.all_reduce(squares, group=self.dp_process_group)
    norm = squares.sqrt()
    skip = (~torch.isfinite(norm)).float()  # fused AdamW leaves parameters and moments alone where this is 1
    basic = self.optimizer
    # DeepSpeed's factor: the norm over the clip threshold, never below 1 (no loss scale in bf16/fp32)
    basic.grad_scale = ((norm + 1e-6) / self.clip_grad).clamp(min=1.0) if self.clip_grad > 0 else None
    basic.found_inf = skip
    self.zero_grad(set_to_none=True)
    try:
        for i in groups:
            fp32 = self.fp32_partitioned_groups_flat[i]
            fp32.grad = grads[i].to(fp32.dtype)
            self.averaged_gradients[i] = None
            self._optimizer_step(i)
            self._reassign_or_swap_out_partitioned_parameters(i)  # the bf16 partition from the float32 one
            self._release_sub_group(i, set())
    finally:
        basic.grad_scale = basic.found_inf = None
    self._partition_all_parameters()  # while the device runs the update queued above
    self._post_step(set())
    # the one sync: the engine steps the LR schedule only if the update was applied
    self.overflow = bool(skip.item())
    self._global_grad_norm = torch.full_like(norm, math.inf) if self.overflow else norm
    if self.overflow:
        self.averaged_gradients = {}
