"""Measure peak allocated memory of accelbench's own training step against the analytic estimate.

One engine per (case, stage); several micro-batches are stepped through the same engine at a fixed
sequence length (every sample `--seq` tokens, 576 of them image tokens), resetting the peak between
them. The step is the trainer's: packed rows through the varlen attention and the target-only objective
(`--padded` uses transformers' own loss on a padded batch instead). Run under torchrun/`python -m torch.distributed.run --nproc-per-node N`. Rank 0 prints one JSON
line per point and writes them to $OUT/memory_check.jsonl when OUT is set.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/gpu/memory_check.py \
        --case llava1.5-7b --stage finetune --mbs 8 16 --seq 2048
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--stage", required=True, choices=["pretrain", "finetune"])
    ap.add_argument("--mbs", type=int, nargs="+", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--padded", action="store_true", help="transformers' loss on padded rows (the peer's step)")
    args = ap.parse_args()

    from accelbench.worker_env import quiet_framework_logs

    quiet_framework_logs()
    import deepspeed
    import torch

    from accelbench.backends import load_registry
    from accelbench.cases import get_preset
    from accelbench.memory import MemoryPlanInput, estimate_memory
    from accelbench.train.data import host_positions
    from accelbench.plan import STAGE_DEFAULTS
    from accelbench.train.ds_config import deepspeed_config
    from accelbench.train.model import build_model, enable_checkpointing, freeze_for_stage
    from accelbench.train.objective import LlavaObjective
    from accelbench.train.varlen_attention import register

    backend = load_registry().select()
    accelerator = backend.deepspeed_accelerator()
    if accelerator is not None:
        from deepspeed.accelerator import set_accelerator

        set_accelerator(accelerator)
    deepspeed.init_distributed(dist_backend=backend.device_info().dist_backend)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = backend.device_info().torch_device_type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")  # cpu: a smoke test of the script
    preset = get_preset(args.case)
    zero = STAGE_DEFAULTS[args.stage].zero_stage
    attn = "sdpa"
    kernel = attn if args.padded else register()
    dtype = "bf16" if cuda else "fp32"
    ds = deepspeed_config(zero_stage=zero, micro_batch=max(args.mbs), grad_accum=1, world_size=world, dtype=dtype,
                          hidden_size=preset.llm.hidden)
    image_token = preset.llm.vocab - 1
    model = build_model(preset, image_token_id=image_token, pad_token_id=0, dtype=dtype, attn_implementation=kernel,
                        device=device, zero3_config=ds if zero == 3 else None)
    trainable = freeze_for_stage(model, args.stage)
    enable_checkpointing(model)
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model if args.padded else LlavaObjective(model), optimizer=opt, config=ds)
    n_img = preset.vision.image_tokens
    out_path = os.path.join(os.environ["OUT"], "memory_check.jsonl") if os.environ.get("OUT") and rank == 0 else None
    for mbs in sorted(args.mbs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(mbs)
        times = []
        for _ in range(args.steps):
            ids = torch.randint(3, 1000, (mbs, args.seq), generator=g)
            ids[:, 1:1 + n_img] = image_token
            labels = ids.clone()
            labels[:, : 1 + n_img] = -100
            pix = torch.randn(mbs, 3, preset.vision.image_size, preset.vision.image_size, generator=g)
            t0 = time.perf_counter()
            pix = pix.to(device, model.dtype)
            if args.padded:
                loss = engine(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                              labels=labels.to(device), pixel_values=pix).loss
            else:  # one packed row of mbs samples, as the trainer feeds it (with the positions found on the host)
                cu = torch.arange(0, (mbs + 1) * args.seq, args.seq, dtype=torch.int32, device=device)
                ids, labels = ids.reshape(1, -1), labels.reshape(1, -1)
                found = {k: v.to(device) for k, v in host_positions(ids, labels, image_token).items()}
                loss = engine(input_ids=ids.to(device), labels=labels.to(device), **found,
                              pixel_values=pix, position_ids=torch.arange(args.seq).repeat(mbs)[None].to(device),
                              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=args.seq, max_length_k=args.seq)
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        measured = torch.cuda.max_memory_allocated() if cuda else 1
        reserved = torch.cuda.max_memory_reserved() if cuda else 1
        est = estimate_memory(MemoryPlanInput(preset=preset, stage=args.stage, zero_stage=zero, dp_size=world,
                                              micro_batch=mbs, seq_len=args.seq, attn_impl=attn, ds_config=ds,
                                              loss_impl="hf" if args.padded else "objective",
                                              packed=not args.padded))
        row = {"path": "padded-hf-loss" if args.padded else "packed-objective", "case": args.case, "stage": args.stage, "zero": zero, "dp": world, "mbs": mbs, "seq": args.seq,
               "measured_alloc_gib": measured / 2**30, "measured_reserved_gib": reserved / 2**30,
               "estimate_gib": est.total / 2**30, "error": est.total / measured - 1,
               "estimate_allocated_gib": est.allocated / 2**30, "error_allocated": est.allocated / measured - 1,
               "step_s_median": sorted(times)[len(times) // 2], "loss": float(loss.detach())}
        if rank == 0:
            print(json.dumps(row), flush=True)
            if out_path:
                with open(out_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
