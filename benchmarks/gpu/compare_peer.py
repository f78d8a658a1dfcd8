"""accelbench vs the HF Trainer + DeepSpeed peer on a GPU machine (same model, data, settings).

On the device machine (after ``bash benchmarks/gpu/setup_device.sh``, which installs deepspeed,
transformers and this project into /tmp/site):

    PYTHONPATH=/tmp/site python3 benchmarks/gpu/compare_peer.py --case llava1.5-7b --stage finetune \\
        --mbs 16 --steps 20 --nproc 2 --fixed-len 1024

Both paths get N GPUs through torch's elastic launcher: the peer as
``python -m torch.distributed.run --standalone --nproc-per-node N benchmarks/hf_peer.py ...``, accelbench as
``accelbench run --nproc-per-node N ...`` (torchrun's machinery in-process).  ``--fixed-len L`` writes a data
folder where every sample is exactly L tokens with one image (576 image tokens for the real presets) and
hands it to both (FINDINGS.md's peer measurement setting).  Runs alternate A/B, B/A per repeat.

The table: tokens/s per GPU (real tokens, steady steps), MFU and HFU from accelbench's analytic FLOPs
(``flops.step_flops``, computed per micro-batch by both paths) against ``--peak-tflops`` (989.4: H200 dense
bf16), peak allocated memory on rank 0, padding efficiency, loss after N steps, the device allocator's retries
(accelbench's step records), and accelbench / peer.

CPU smoke test of this script (runs here): ``python benchmarks/gpu/compare_peer.py --case tiny --nproc 1
--steps 3 --repeats 1 --fixed-len 256``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
import tempfile
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: compare_cpu (the shared runners)
sys.path.insert(0, str(HERE))

import compare_cpu as cc  # noqa: E402
import loss_check  # noqa: E402

H200_BF16_PEAK_TFLOPS = 989.4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="llava1.5-7b", help="llava1.5-7b, llava1.5-13b (tiny: CPU smoke test)")
    p.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"))
    p.add_argument("--mbs", type=int, help="micro-batch per GPU (default: the stage's LLaVA value, 32/16)")
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=1, help="GPUs (processes) per path")
    p.add_argument("--seq", type=int, default=2048, help="model_max_length")
    p.add_argument("--fixed-len", type=int, help="every sample exactly this many tokens (one image each), e.g. 1024")
    p.add_argument("--repeats", type=int, default=1, help="runs of each path (with --no-peer: of accelbench); "
                   "the ablations run once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS,
                   help="per-device dense peak for MFU/HFU (default: H200 bf16, 989.4)")
    p.add_argument("--data", help="LLaVA-format data folder (default: accelbench's synthetic set)")
    p.add_argument("--out", help="folder for data, logs and summaries (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--ablate", default="", metavar="LEVER[,LEVER]",
                   help="after the pair, one accelbench run per lever with `--without LEVER` (accelbench.plan.LEVERS)")
    p.add_argument("--variants", default="", metavar="OPTIONS[;OPTIONS]",
                   help="after the pair, one accelbench run per ';'-separated set of extra `accelbench run` options, "
                        "e.g. '--offload 6;--offload 10'")
    p.add_argument("--no-peer", action="store_true", help="accelbench (and its ablations) only")
    p.add_argument("--no-accelbench", action="store_true",
                   help="the peer only (--repeats runs), with the 5e8-element ZeRO-3 buckets of accelbench's plan")
    # the peer's rounding variants, for the loss check's tolerance (hf_peer.py --attn / --optim)
    p.add_argument("--peer-attn", choices=("sdpa", "eager"), help="the peer's attn_implementation (default sdpa)")
    p.add_argument("--peer-optim", choices=("adamw_torch_fused", "adamw_torch"),
                   help="the peer's TrainingArguments.optim (default adamw_torch_fused, the Trainer's)")
    p.add_argument("--path-timeout", type=float, default=1800,
                   help="seconds one path may run before it is recorded as failed and the table printed anyway")
    p.add_argument("--without", default="", metavar="LEVER[,LEVER]",
                   help="levers the main accelbench run goes without (e.g. fused-kernels where Liger is unusable)")
    p.add_argument("--ds-config", help="DeepSpeed JSON both paths merge over the shared config (ZeRO tuning)")
    a = p.parse_args(argv)
    if a.fixed_len and a.data:
        p.error("--fixed-len builds its own data folder: drop --data")
    if a.no_peer and a.no_accelbench:
        p.error("--no-peer and --no-accelbench leave nothing to run")
    if a.fixed_len and a.fixed_len > a.seq:
        p.error(f"--fixed-len {a.fixed_len} exceeds --seq {a.seq}")
    return a


def peer_options(a: argparse.Namespace) -> tuple[str, ...]:
    return (*(("--attn", a.peer_attn) if a.peer_attn else ()), *(("--optim", a.peer_optim) if a.peer_optim else ()))


def add_utilisation(results: Sequence[cc.RunResult], peak_flops: float) -> None:
    """MFU/HFU against one stated peak for both paths, peak memory in GiB."""
    for r in results:
        s = r.summary
        s["mfu_vs_peak"] = s["model_flops_per_s_per_proc"] / peak_flops if s.get("model_flops_per_s_per_proc") else None
        s["hfu_vs_peak"] = (s["hardware_flops_per_s_per_proc"] / peak_flops
                            if s.get("hardware_flops_per_s_per_proc") else None)
        s["mem_peak_gib"] = s["mem_peak_allocated"] / 2**30 if s.get("mem_peak_allocated") else None


GPU_COLUMNS = [
    ("tokens/s per GPU", "tokens_per_s_per_proc", ".1f"),
    ("step s (median)", "step_time_s_median", ".3f"),
    ("MFU", "mfu_vs_peak", ".2%"),
    ("HFU", "hfu_vs_peak", ".2%"),
    ("peak mem GiB", "mem_peak_gib", ".2f"),
    ("padding eff.", "padding_efficiency", ".3f"),
    ("loss after N steps", "loss_last", ".4f"),
    ("allocator retries", "alloc_retries", "g"),  # accelbench's records only: a retry syncs and frees the cache
]


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    cc.stop_on_sigterm()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="accelbench-peer-gpu-"))
    data = a.data
    if a.fixed_len:
        from fixed_len import make_fixed_len_data

        data = str(make_fixed_len_data(out / f"data-fixed{a.fixed_len}-{a.case}", case=a.case, length=a.fixed_len,
                                       seed=a.seed))
    s = cc.Settings(case=a.case, stage=a.stage, steps=a.steps, mbs=a.mbs, gas=a.gas, seq=a.seq, nproc=a.nproc,
                    seed=a.seed, data=data, accelbench_args=("--without", a.without) if a.without else (),
                    ds_config=str(Path(a.ds_config).resolve()) if a.ds_config else None, peer_options=peer_options(a))
    print(f"{a.case} {a.stage}: {a.nproc} GPU(s), mbs {a.mbs or 'default'}, gas {a.gas}, {a.steps} steps x "
          f"{a.repeats} repeat(s), {'fixed ' + str(a.fixed_len) + ' tokens' if a.fixed_len else 'variable lengths'}; "
          f"logs in {out}", flush=True)
    if a.no_peer:
        results = [cc.attempt(cc.ACCELBENCH, r, lambda r=r: cc.run_accelbench(s, out, r, timeout=a.path_timeout))
                   for r in range(a.repeats)]
    elif a.no_accelbench:
        results = [cc.attempt(cc.PEER, r, lambda r=r: cc.run_peer(s, out, r, timeout=a.path_timeout, torchrun=True))
                   for r in range(a.repeats)]
    else:
        results = cc.run_interleaved(s, out, a.repeats, peer_torchrun=True, timeout=a.path_timeout)
    ablations = [ablate(s, out, a.without, lever, a.path_timeout) for lever in a.ablate.split(",")
                 if lever and lever not in a.without.split(",")]
    ablations += [variant(s, out, options, a.path_timeout) for options in a.variants.split(";") if options.strip()]
    add_utilisation(results + ablations, a.peak_tflops * 1e12)
    print(f"\nMFU/HFU: accelbench's analytic FLOPs per GPU-second / {a.peak_tflops} TFLOP/s; "
          f"steady steps {results[0].summary.get('steady_steps')} of {a.steps}")
    for r in results + ablations:
        if r.summary.get("_plan"):
            print(f"  {r.path}: plan {r.summary['_plan']}")
        if r.summary.get("cut_off"):
            print(f"  {r.path}: {r.summary['cut_off']}")
    cc.print_table(results, s, GPU_COLUMNS)  # with one path only, its rows and medians
    if ablations:
        print_ablation(results[0], ablations)
    print_loss_check(results, ablations)
    if a.json:
        cc.write_results_json(a.json, results + ablations)
    return 0


def print_loss_check(results: Sequence[cc.RunResult], ablations: Sequence[cc.RunResult]) -> None:
    """accelbench's loss curve against the peer's, and the bf16 noise floor of this call (loss_check.py):
    repeats of the same path and accelbench without a rounding-only lever."""
    runs = [{"path": r.path, "repeat": r.repeat, "step_losses": cc.step_losses(r)}
            for r in [*results, *ablations] if "error" not in r.summary]
    print(loss_check.report(loss_check.check(loss_check.curves(runs))))


def ablate(s: cc.Settings, out: Path, without: str, lever: str, timeout: float) -> cc.RunResult:
    return extra_run(s, out, f"accelbench --without {lever}",
                     ("--without", ",".join(filter(None, (without, lever)))), timeout)


def variant(s: cc.Settings, out: Path, options: str, timeout: float) -> cc.RunResult:
    return extra_run(s, out, f"accelbench {options.strip()}", (*s.accelbench_args, *shlex.split(options)), timeout)


def extra_run(s: cc.Settings, out: Path, label: str, accelbench_args: tuple[str, ...], timeout: float) -> cc.RunResult:
    """One more accelbench run after the pair, on the same data, with other options."""
    settings = replace(s, accelbench_args=accelbench_args)
    result = cc.attempt(label, 0, lambda: cc.run_accelbench(settings, out, 0, timeout=timeout, label=label))
    print(f"  {label}: {result.summary.get('error') or format(result.tps, '.1f') + ' tok/s/proc'}", flush=True)
    return result


def print_ablation(full: cc.RunResult, ablations: Sequence[cc.RunResult]) -> None:
    """One row per lever turned off: what accelbench loses without it (full / without, tokens/s)."""
    head = ["run", *[c[0] for c in GPU_COLUMNS], "full / this (tokens/s)"]
    print("\n| " + " | ".join(head) + " |\n|" + "|".join(" --- " for _ in head) + "|")
    for r in [full, *ablations]:
        if "error" in r.summary:
            print(f"| {r.path} | failed: {r.summary['error']} |")
            continue
        cells = [r.path, *["n/a" if r.summary.get(k) is None else format(r.summary[k], f) for _, k, f in GPU_COLUMNS],
                 "n/a" if "error" in full.summary else f"{full.tps / r.tps:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
