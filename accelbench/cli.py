"""The `accelbench` command. Queries (backends, info, plan, mfu) never import deepspeed or transformers."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import AccelbenchError


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


# -- backends / info ----------------------------------------------------------------------------
def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import load_registry

    reg = load_registry()
    statuses = reg.statuses()
    listed = {s.plugin.name for s in statuses}
    broken_plugins = [p for p in reg.plugins if p.broken and p.name not in listed]
    if args.json:
        _print_json({"backends": [s.to_dict() for s in statuses],
                     "broken_plugins": [p.to_dict() for p in broken_plugins]})
        return 0
    for s in statuses:
        print(s.line())
    for p in broken_plugins:
        print(f"plugin {p.name} ({p.dist} {p.version}): broken: {p.error}")
    return 0


def _select(args: argparse.Namespace) -> Any:
    from .backends import load_registry

    return load_registry().select(getattr(args, "backend", None))


def cmd_info(args: argparse.Namespace) -> int:
    backend = _select(args)
    caps = backend.capabilities()
    if args.json:
        _print_json(caps)
        return 0
    dev, att, prec = backend.device_info(), backend.attention(), backend.precision()
    print(f"backend: {backend.name} ({backend.why})")
    print(f"vendor: {dev.vendor}; devices: {dev.device_count} x {', '.join(sorted(set(dev.device_names)))}")
    print(f"memory per device: {', '.join(_gib(m) for m in dev.memory_bytes)}; chips per board: {dev.chips_per_board}")
    print(f"torch device: {dev.torch_device_type}; DeepSpeed accelerator: {dev.deepspeed_accelerator}; "
          f"distributed backend: {dev.dist_backend}")
    for p in dev.peak_flops:
        value = f"{p.flops / 1e12:.1f} TFLOP/s {p.basis}" if p.known else "unknown"
        print(f"peak {p.dtype}: {value} ({p.source})")
    print("attention (preferred first): " + "; ".join(
        f"{i.name} (varlen={i.varlen}{', env ' + str(i.env) if i.env else ''}"
        f"{', needs ' + ','.join(i.packages) if i.packages else ''})" for i in att.implementations))
    print(f"precision: bf16={prec.bf16} fp16={prec.fp16} tf32={prec.tf32}; default {prec.default_dtype}; "
          f"tf32 policy {prec.tf32_policy}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in dev.versions.items()))
    return 0


# -- plan ---------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from .backends import load_registry
    from .machine import describe_machine, parse_bytes
    from .plan import build_plan, check_positive
    from .train.ds_config import load_overrides

    check_positive("--nproc", args.nproc, "give the number of processes, 1 or more")
    machine = None
    if args.device_name or args.device_memory:
        if not (args.device_name and args.device_memory):
            raise AccelbenchError("describe a machine with both --device-name and --device-memory")
        memory = parse_bytes(args.device_memory)
        machine = describe_machine(args.device_name, memory, count=1)
        if args.assume_package:
            machine = machine.with_packages(*args.assume_package)
    reg = load_registry(machine=machine)
    backend = reg.select(args.backend)
    plan = build_plan(backend, case=args.case, stage=args.stage, nproc=args.nproc, micro_batch=args.mbs,
                      grad_accum=args.gas, seq_len=args.seq, recompute=args.recompute, offload=args.offload,
                      without=[w for w in (args.without or "").split(",") if w],
                      ds_overrides=load_overrides(args.ds_config) if args.ds_config else None)
    if args.json:
        _print_json(plan.to_dict())
        return 0
    print(render_plan(plan))
    return 0


def render_plan(plan: Any) -> str:
    lines = [
        f"plan: {plan.case} {plan.stage} on {plan.backend}: {plan.nproc} x {plan.device_name} "
        f"({_gib(plan.device_memory)} each)",
        f"  dtype {plan.dtype}; tf32 {'on' if plan.tf32 else 'off'}; attention {plan.attn_implementation}"
        f"{' (packed)' if plan.packed else ''}; kernels {plan.kernels}; loss {plan.loss}",
        f"  gradient checkpointing {'on' if plan.grad_ckpt else 'off'}: {plan.recompute_layers} of "
        f"{plan.preset.llm.layers} decoder layers replayed"
        + (f" (at {plan.micro_batch_tokens} tokens per micro-batch)" if plan.micro_batch_tokens else
           f" (sized for {plan.micro_batch} x {plan.seq_len} tokens per micro-batch; a run sizes it from the data)")
        + (f"; smaller micro-batches replay fewer, {plan.recompute_table[0][1]} up to "
           f"{plan.recompute_table[0][0]} tokens" if len(plan.recompute_table) > 1 else "")
        + (f"; {plan.offload_layers} kept in host memory" if plan.offload_layers else "")
        + (f" (fewer up to {plan.offload_table[-2][0]} tokens)" if len(plan.offload_table) > 1 else ""),
        f"  ZeRO stage {plan.zero_stage}; lr {plan.lr:g}",
        f"  micro-batch (LBS) {plan.micro_batch} (requested {plan.micro_batch_requested}); GAS {plan.grad_accum}; "
        f"GBS {plan.global_batch}; MPE {plan.seq_len}",
        "  environment: " + (" ".join(f"{k}={v}" for k, v in sorted(plan.env.items())) or "(none)"),
    ]
    if plan.memory:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in plan.memory.get("terms", {}).items())
        cal = plan.memory.get("calibration", 1.0)
        scaled = f" x {cal:.2f} backend calibration = {plan.memory['calibrated_total']:.2f}" if cal != 1.0 else ""
        lines.append(f"  memory estimate at LBS {plan.micro_batch}: {plan.memory.get('total', 0):.2f} "
                     f"{plan.memory.get('unit', 'GiB')}{scaled} of {_gib(plan.usable_memory)} usable ({terms})")
    lines.append(f"  adjustments ({len(plan.adjustments)}):")
    lines += [f"    - [{a.by}] {a.what}: {a.from_} -> {a.to}: {a.why}" for a in plan.adjustments] or ["    (none)"]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


# -- mfu calculator -----------------------------------------------------------------------------
def cmd_mfu(args: argparse.Namespace) -> int:
    from .train.flops import flagperf_mfu

    if not args.flagperf:
        raise AccelbenchError("only the FlagPerf formula is a calculator: pass --flagperf (k*N*tokens/s/peak)")
    for opt, value in (("--params", args.params), ("--tokens-per-sec", args.tokens_per_sec),
                       ("--peak-tflops", args.peak_tflops)):
        if not value > 0:
            raise AccelbenchError(f"{opt} {value!r} must be positive")
    value = flagperf_mfu(args.params, args.stage, args.tokens_per_sec, args.peak_tflops * 1e12)
    print(f"{value * 100:.2f} %")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    from . import cli_run  # run, data, eval: defined beside the code they drive

    p = argparse.ArgumentParser(prog="accelbench", description=__doc__)
    p.add_argument("--version", action="version", version=f"accelbench {__version__}")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("backends", help="list every registered backend and whether it is usable here")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_backends)

    s = sub.add_parser("info", help="capabilities of the selected backend on this machine")
    s.add_argument("--backend")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("plan", help="dry run: resolve a run plan for this or a described machine")
    s.add_argument("--case", default="llava1.5-13b")
    s.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    s.add_argument("--backend")
    s.add_argument("--device-name", help='describe a machine, e.g. "Iluvatar BI-V150"')
    s.add_argument("--device-memory", help="memory per device (process), e.g. 32GiB")
    s.add_argument("--assume-package", action="append", default=[],
                   help="treat a package (e.g. flash_attn) as importable on the described machine")
    s.add_argument("--nproc", type=int, default=8, help="data-parallel processes in total")
    s.add_argument("--mbs", help="micro-batch per process, or 'auto' (default: the case's)")
    s.add_argument("--gas", type=int, default=1, help="gradient-accumulation steps")
    s.add_argument("--seq", type=int, default=2048, help="sequence cap (model_max_length)")
    cli_run.add_speed_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("mfu", help="MFU calculator for published tables")
    s.add_argument("--flagperf", action="store_true", help="FlagPerf's k*N*tokens/s/peak (k=2 pretrain, 6 finetune)")
    s.add_argument("--params", type=float, required=True)
    s.add_argument("--stage", choices=["pretrain", "finetune"], required=True)
    s.add_argument("--tokens-per-sec", type=float, required=True)
    s.add_argument("--peak-tflops", type=float, required=True)
    s.set_defaults(func=cmd_mfu)

    cli_run.register(sub)
    from . import cli_report  # report, compare, import-flagperf

    cli_report.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AccelbenchError as exc:
        print(f"accelbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accelbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
