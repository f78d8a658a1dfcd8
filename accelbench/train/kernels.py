"""Fused kernel sets the trainer can switch on by name (a backend offers them in its capabilities).

They replace transformers' module classes, so they must be applied before the model is built.
"""
from __future__ import annotations

from ..errors import ConfigError


def apply_kernels(name: str) -> None:
    """Install kernel set ``name`` for Llama decoder layers in this process ("hf": leave transformers' own)."""
    if name == "hf":
        return
    if name == "liger":
        # RMSNorm, SwiGLU and RoPE only: the loss is accelbench's target-only chunked objective
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
        return
    raise ConfigError(f"kernel set {name!r} is unknown to the trainer: the backend offered it, but only "
                      f"'hf' and 'liger' can be applied (run with --without fused-kernels)")
