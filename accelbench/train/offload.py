"""Lever "offload-activations": some decoder layers keep their activations in pinned host memory, not on the device.

A layer that keeps its activations on the device costs memory; one that is replayed costs a second forward. An
offloaded layer costs neither: what autograd saves inside it is copied to pinned host memory on a side stream while
the following layers compute, and copied back on another side stream while the layers above it run their backward.
The copies ride the host link (PCIe), which the GEMMs do not use, so where the planner offloads only as many layers
as the link can move in the time the forward takes, the replays they replace are saved outright
(``plan._fit_offload``; the memory model counts an offloaded layer as keeping only its small tensors).

Mechanism: ``torch.autograd.graph.saved_tensors_hooks`` around the layer's forward (a compiled layer's saved tensors
pass through them too). A tensor is copied only if it is large (``MIN_BYTES``) and is neither a parameter of the
layer (ZeRO-3 gathers and releases those itself) nor one of the layer's other inputs (the rotary cos/sin, shared by
every layer). In the backward, reaching a layer (the gradient of its output) starts the copy back of the next
``LOOKAHEAD`` offloaded layers below it, so each arrives before its own backward needs it. The copies back land in
memory taken from the compute stream's pool, so the activations of the next forward can reuse it.
"""
from __future__ import annotations

import types
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..memory import OFFLOAD_LOOKAHEAD as LOOKAHEAD

MIN_BYTES = 1 << 20  # smaller saved tensors (the norms' fp32 rstd) stay on the device


class _Saved:
    """One saved tensor while it lives on the host."""

    __slots__ = ("host", "device", "copied", "back", "arrived")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Any):
        self.host: torch.Tensor | None = host
        self.device, self.copied = device, copied  # copied: the D2H's event (None on a CPU device)
        self.back: torch.Tensor | None = None  # the device copy, once fetched
        self.arrived: Any = None  # the H2D's event

    def fetch(self, stream: Any) -> None:
        """Copy back to the device on ``stream`` (a side stream, or None: the current one)."""
        if self.back is not None or self.host is None:  # fetched already, or taken
            return
        # allocated on the compute stream, from its pool, also for a side stream's copy: the caching allocator keeps
        # one pool per stream, and a side stream's would hold these bytes through the next forward, when the compute
        # stream needs them most
        self.back = _empty_like(self.host, self.device)
        if stream is None:
            self.back.copy_(self.host, non_blocking=self.device.type != "cpu")
            return
        # the block may be one that work queued on the compute stream still reads
        stream.wait_stream(torch.cuda.current_stream(self.device))
        stream.wait_event(self.copied)
        with torch.cuda.stream(stream):
            self.back.copy_(self.host, non_blocking=True)
            self.arrived = torch.cuda.Event()
            self.arrived.record(stream)
        self.back.record_stream(stream)  # not reused before the copy ends, even if the backward never takes it

    def take(self) -> torch.Tensor:
        """The device tensor, for the backward on the current stream."""
        if self.back is None:  # not prefetched (the first offloaded layer of a backward, at most)
            if self.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.fetch(None)
        elif self.arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(self.arrived)
        # the device copy lives as long as the backward node that asked for it; the arena's bytes are written again
        # only by the next micro-batch's copies to the host, which the device runs after this backward
        back, self.back, self.host, self.arrived = self.back, None, None, None
        return back  # type: ignore[return-value]


def _empty_like(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # the same strides: a compiled backward asserts them on what it saved
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)


class _Arena:
    """Pinned host memory that one offloaded layer's saved tensors are copied into, reused every micro-batch.

    Pinning is slow (page-locking a gigabyte takes a good part of a second), so it happens once, at the size the
    planner expects of the largest micro-batch, and again only for a micro-batch larger than any before (with room
    to spare, ``GROWTH``)."""

    ALIGN, GROWTH = 512, 1.25

    def __init__(self, nbytes: int, pin: bool):
        self.pin = pin
        self.memory = self._memory(nbytes)
        self.start = 0  # where the next tensor goes in ``memory``
        self.total = 0  # bytes this micro-batch asked for, in this and in outgrown memory

    def _memory(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def reset(self) -> None:
        """A new micro-batch: the backward that took the last one's tensors waited for their copies back."""
        if self.total > self.memory.numel():  # the last one outgrew this memory (in pieces): one piece from now on
            self.memory = self._memory(int(self.total * self.GROWTH))
        self.start = self.total = 0

    def take_like(self, t: torch.Tensor) -> torch.Tensor:
        """Host memory shaped and strided like ``t``."""
        span = 1 + sum((n - 1) * st for n, st in zip(t.size(), t.stride())) if t.numel() else 0
        nbytes = -(-span * t.element_size() // self.ALIGN) * self.ALIGN
        self.total += nbytes
        if self.start + nbytes > self.memory.numel():
            # the tensors already placed keep the outgrown memory alive until the backward takes them
            self.memory = self._memory(int(self.total * self.GROWTH))
            self.start = 0
        flat = self.memory[self.start:self.start + span * t.element_size()].view(t.dtype)
        self.start += nbytes
        return flat.as_strided(t.size(), t.stride())


class ActivationOffload:
    """Offloads the saved tensors of the decoder layers named by ``set_layers`` (see the module's docstring)."""

    def __init__(self, device: torch.device, layer_bytes: int = 0, min_bytes: int = MIN_BYTES):
        """``layer_bytes``: what one layer is expected to save at the largest micro-batch (each offloaded layer's
        pinned memory starts at that size)."""
        self.device, self.layer_bytes, self.min_bytes = device, layer_bytes, min_bytes
        cuda = device.type == "cuda"
        self.to_host = torch.cuda.Stream(device) if cuda else None
        self.to_device = torch.cuda.Stream(device) if cuda else None
        self.pin = cuda
        self.layers: dict[int, int] = {}  # offloaded layer index -> its slot (the arena it copies into)
        self.groups: dict[int, list[_Saved]] = {}  # layer index -> its saved tensors on the host, this micro-batch
        self.arenas: list[_Arena] = []  # one per slot: the n-th offloaded layer of a micro-batch copies into the n-th
        self.bytes_offloaded = 0  # since the last reset_counts: to the host
        self.late = 0  # tensors the backward needed before their copy back was started

    def attach(self, layers: Sequence[torch.nn.Module]) -> None:
        """Wrap each layer's forward (after ``kernels.compile_layers``: the compiled forward runs inside)."""
        for index, layer in enumerate(layers):
            layer.forward = types.MethodType(self._forward(index, layer.forward), layer)

    def set_layers(self, indices: Iterable[int]) -> None:
        """The layers to offload from the next forward on (the stage sets them for each micro-batch)."""
        self.layers = {index: slot for slot, index in enumerate(sorted(indices))}
        while len(self.arenas) < len(self.layers):
            self.arenas.append(_Arena(self.layer_bytes, self.pin))

    def reset_counts(self) -> None:
        self.bytes_offloaded = self.late = 0

    def _forward(self, index: int, inner: Any) -> Any:
        def forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled() or not self.layers:
                return inner(*args, **kwargs)
            if index in self.layers:
                # the layer's weights and the inputs it shares with the other layers (all but the hidden states)
                # stay where they are
                others = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")]
                shared = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *_tensors(others))}
                saved = self.groups[index] = []
                arena = self.arenas[self.layers[index]]
                arena.reset()
                with torch.autograd.graph.saved_tensors_hooks(self._packer(saved, shared, arena), self._unpack):
                    out = inner(*args, **kwargs)
            else:
                out = inner(*args, **kwargs)
            result = out[0] if isinstance(out, tuple) else out
            if result.requires_grad and any(i < index for i in self.layers):
                result.register_hook(lambda grad: self._reached(index))
            return out

        return forward

    def _packer(self, saved: list[_Saved], shared: set[int], arena: _Arena) -> Any:
        def pack(t: torch.Tensor) -> Any:
            if (t.device != self.device or t.numel() * t.element_size() < self.min_bytes
                    or t.untyped_storage().data_ptr() in shared):
                return t
            host = arena.take_like(t)
            copied = None
            if self.to_host is not None:
                self.to_host.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
                with torch.cuda.stream(self.to_host):
                    host.copy_(t, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.to_host)
                t.record_stream(self.to_host)  # its memory is reused only after the copy
            else:
                host.copy_(t)
            self.bytes_offloaded += t.numel() * t.element_size()
            entry = _Saved(host, t.device, copied)
            saved.append(entry)
            return entry

        return pack

    def _unpack(self, entry: Any) -> torch.Tensor:
        if not isinstance(entry, _Saved):
            return entry
        if entry.back is None:
            self.late += 1
        return entry.take()

    def _reached(self, index: int) -> None:
        """The backward is about to run layer ``index``: copy back the next LOOKAHEAD offloaded layers below it."""
        for below in sorted((i for i in self.layers if i < index), reverse=True)[:LOOKAHEAD]:
            for entry in self.groups.get(below, ()):
                if entry.host is not None:
                    entry.fetch(self.to_device)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []
