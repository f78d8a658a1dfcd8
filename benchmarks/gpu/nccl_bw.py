"""All-gather and reduce-scatter bandwidth between this machine's GPUs, alone (no compute beside them): the
ceiling ZeRO-3's parameter gathers and gradient reductions run against.
    torchrun --nproc-per-node N benchmarks/gpu/nccl_bw.py [--mib 256 64 8] [--iters 20]
Prints one JSON line per collective and size from rank 0: algbw (bytes of the full tensor / time) and busbw
(nccl-tests' bus bandwidth, (n-1)/n of algbw for these two collectives)."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, nargs="+", default=[256, 64, 8], help="size of the full (gathered) tensor")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    for mib in a.mib:
        full = torch.empty(mib * 2**20 // 2 // world * world, dtype=torch.bfloat16, device="cuda")
        shard = torch.ones(full.numel() // world, dtype=torch.bfloat16, device="cuda")
        for name, fn in (("all_gather", lambda: dist.all_gather_into_tensor(full, shard)),
                         ("reduce_scatter", lambda: dist.reduce_scatter_tensor(shard, full))):
            s = timed(fn, a.iters)
            algbw = full.numel() * 2 / s / 1e9
            if rank == 0:
                print(json.dumps({"collective": name, "world": world, "MiB": mib, "ms": round(s * 1e3, 3),
                                  "algbw_GBps": round(algbw, 1), "busbw_GBps": round(algbw * (world - 1) / world, 1)}),
                      flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
