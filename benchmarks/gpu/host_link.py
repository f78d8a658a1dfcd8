"""The host link as lever "offload-activations" uses it: pinned-memory copies on side streams, beside GEMMs.

Prints JSON lines: the copy rate to the host, back to the device, and both at once, alone; then a stream of
decoder-layer-sized GEMMs (13B widths) alone and with both copies running beside them, and the copy rates then.
The planner's figure (``Backend.host_link``: PCIe generation and width by NVML, times the NVIDIA backend's
``COPY_EFFICIENCY``) is printed beside them.

    python3 benchmarks/gpu/host_link.py
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

GiB = 1 << 30
CHUNK = 128 << 20  # bytes per copied tensor: a 13B layer saves about ten of 65-350 MB at 12k tokens


def _copies(device: torch.device, total: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    n = total // CHUNK
    dev = [torch.empty(CHUNK // 2, dtype=torch.bfloat16, device=device) for _ in range(n)]
    host = [torch.empty(CHUNK // 2, dtype=torch.bfloat16, pin_memory=True) for _ in range(n)]
    return dev, host


def _run(work: dict[str, tuple[torch.cuda.Stream, list[Callable[[], Any]]]]) -> dict[str, float]:
    """Queue each named list of operations on its stream, all at once; the seconds each list took."""
    torch.cuda.synchronize()
    start = {name: torch.cuda.Event(enable_timing=True) for name in work}
    end = {name: torch.cuda.Event(enable_timing=True) for name in work}
    for name, (stream, ops) in work.items():
        with torch.cuda.stream(stream):
            start[name].record(stream)
            for op in ops:
                op()
            end[name].record(stream)
    torch.cuda.synchronize()
    return {name: start[name].elapsed_time(end[name]) / 1e3 for name in work}


def _copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], Any]:
    return lambda: dst.copy_(src, non_blocking=True)


def main() -> None:
    device = torch.device("cuda", 0)
    total = 4 * GiB
    dev, host = _copies(device, total)
    dev_in = [torch.empty_like(t) for t in dev]
    to_host, to_device, compute = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    down = [_copy(h, d) for h, d in zip(host, dev)]
    up = [_copy(d, h) for d, h in zip(dev_in, host)]
    _run({"down": (to_host, down[:2]), "up": (to_device, up[:2])})  # warm the copy engines
    rate = lambda seconds: total / seconds / 1e9  # noqa: E731  (GB/s)
    t = _run({"down": (to_host, down)})
    print(json.dumps({"case": "to host alone", "GB_per_s": round(rate(t["down"]), 1)}))
    t = _run({"up": (to_device, up)})
    print(json.dumps({"case": "to device alone", "GB_per_s": round(rate(t["up"]), 1)}))
    t = _run({"down": (to_host, down), "up": (to_device, up)})
    print(json.dumps({"case": "both at once", "to_host_GB_per_s": round(rate(t["down"]), 1),
                      "to_device_GB_per_s": round(rate(t["up"]), 1)}))

    # a 13B layer's up-projection at 12k tokens, repeated for about as long as the copies take
    x = torch.randn(12288, 5120, dtype=torch.bfloat16, device=device)
    w = torch.randn(13824, 5120, dtype=torch.bfloat16, device=device)
    y = torch.empty(12288, 13824, dtype=torch.bfloat16, device=device)
    flops = 2 * 12288 * 5120 * 13824
    gemm = lambda: torch.matmul(x, w.t(), out=y)  # noqa: E731
    _run({"gemm": (compute, [gemm] * 3)})  # cuBLAS's first call picks its kernel
    one = _run({"gemm": (compute, [gemm] * 3)})["gemm"] / 3
    gemms = [gemm] * max(1, int(total / 50e9 / one))
    alone = _run({"gemm": (compute, gemms)})["gemm"]
    t = _run({"gemm": (compute, gemms), "down": (to_host, down), "up": (to_device, up)})
    print(json.dumps({"case": "GEMMs alone", "TFLOP_per_s": round(len(gemms) * flops / alone / 1e12, 1),
                      "seconds": round(alone, 3)}))
    print(json.dumps({"case": "GEMMs with both copies beside them",
                      "TFLOP_per_s": round(len(gemms) * flops / t["gemm"] / 1e12, 1), "seconds": round(t["gemm"], 3),
                      "to_host_GB_per_s": round(rate(t["down"]), 1), "to_device_GB_per_s": round(rate(t["up"]), 1)}))

    from accelbench.backends import select_backend

    backend = select_backend()
    print(json.dumps({"case": "planner's figure", "backend": backend.name,
                      "GB_per_s": round((backend.host_link() or 0) / 1e9, 1), "when": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
