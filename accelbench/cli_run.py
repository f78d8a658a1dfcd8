"""Commands that train, synthesise data and evaluate (added to the `accelbench` parser by cli.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any



def cmd_run(args: argparse.Namespace) -> int:
    from .report.markdown import performance_rows
    from .train.launch import LaunchSpec
    from .train.run import RunOptions, run

    opts = RunOptions(
        case=args.case, backend=args.backend, stages=args.stages.split(","), steps=args.steps, mbs=args.mbs,
        gas=args.gas, seq=args.seq, data=args.data, out=args.out, seed=args.seed, llm=args.llm,
        vision_tower=args.vision_tower, projector=args.projector, eval_mmmu=not args.no_eval,
        mmmu_limit=args.mmmu_limit, mmmu_generation=args.generation, bad_samples=args.bad_samples,
        max_bad_fraction=args.max_bad_fraction, quiet=args.quiet, log_all_ranks=args.log_all_ranks,
        tensorboard=args.tensorboard, zero_stage=args.zero_stage, lr=args.lr,
        save_every=args.save_every, resume=args.resume,
        hang_timeout=args.hang_timeout, recompute=args.recompute, offload=args.offload,
        without=[w for w in (args.without or "").split(",") if w], profile=args.profile,
        ds_config=args.ds_config, launch=LaunchSpec(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                          master_addr=args.master_addr, master_port=args.master_port),
    )
    result = run(opts)
    if "stages" not in result:
        print(f"node {args.node_rank}: done")
        return 0
    rows = performance_rows(result)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(f"run directory: {result['run_dir']} (result.json, report.md, events.jsonl)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .train.synth import synthesize

    paths = synthesize(Path(args.out), n_pretrain=args.n_pretrain, n_finetune=args.n_finetune,
                       image_size=args.image_size, vocab_size=args.vocab_size, seed=args.seed)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_eval_mmmu(args: argparse.Namespace) -> int:
    from .backends import load_registry
    from .eval.runner import evaluate_model_dir

    out = Path(args.out) if args.out else (Path(args.model) / "mmmu.json" if (Path(args.model) / "result.json").exists()
                                           else Path("mmmu.json"))
    backend = load_registry().select(args.backend)
    report = evaluate_model_dir(args.model, args.data, out_path=out, generation=args.generation, limit=args.limit,
                                subjects=args.subjects, backend=backend, quiet=args.quiet, nproc=args.nproc)
    overall = report["overall"]
    print(json.dumps({"accuracy": overall["accuracy"], "correct": overall["correct"], "questions": overall["total"],
                      "fallbacks": report["fallbacks"], "skipped": report["skipped_count"], "out": str(out)}))
    return 0


def add_speed_options(parser: Any) -> None:
    """--recompute, --offload, --without and --ds-config: shared by `run` and `plan`."""
    from .plan import LEVERS

    parser.add_argument("--recompute", default="auto", metavar="auto|all|N",
                        help="decoder layers whose forward is replayed in backward: auto (as few as the memory "
                             "model allows), all, or a number (default auto)")
    parser.add_argument("--offload", default="auto", metavar="auto|N",
                        help="decoder layers that keep their activations in host memory instead of replaying: auto "
                             "(as many as the host link moves beside the forward, where memory makes layers replay) "
                             "or a number (default auto)")
    parser.add_argument("--without", metavar="LEVER[,LEVER]",
                        help="turn speed levers off, for ablations: " + "; ".join(f"{k}: {v}" for k, v in LEVERS.items()))
    parser.add_argument("--ds-config", metavar="FILE",
                        help="DeepSpeed JSON merged over accelbench's config, e.g. ZeRO-3 prefetch and bucket sizes "
                             "(batch sizes, precision, stage, optimizer and scheduler stay the plan's)")


def register(sub: Any) -> None:
    s = sub.add_parser("run", help="train LLaVA-1.5 (pretrain + finetune) and write the report; "
                                   "no arguments: tiny model on synthetic data")
    s.add_argument("--case", default="tiny", help="tiny, llava1.5-7b or llava1.5-13b")
    s.add_argument("--backend")
    s.add_argument("--stages", default="pretrain,finetune")
    s.add_argument("--steps", type=int, help="optimizer steps per stage (default 20)")
    s.add_argument("--mbs", help="micro-batch per process (LBS), or 'auto' (default: the case's)")
    s.add_argument("--gas", type=int, default=1)
    s.add_argument("--seq", type=int, default=2048, help="model_max_length (MPE)")
    s.add_argument("--data", help="folder with LLaVA JSON files, images/, tokenizer/ (default: synthesised)")
    s.add_argument("--out", help="run directory (default runs/DATE-CASE)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--llm", help="local Hugging Face Llama/Vicuna folder")
    s.add_argument("--vision-tower", help="local Hugging Face CLIP vision folder")
    s.add_argument("--projector", help="projector weights (safetensors)")
    s.add_argument("--no-eval", action="store_true", help="skip the MMMU evaluation")
    s.add_argument("--mmmu-limit", type=int)
    s.add_argument("--generation", default="greedy", choices=["greedy", "flagperf"])
    s.add_argument("--bad-samples", default="skip", choices=["skip", "fail"])
    s.add_argument("--max-bad-fraction", type=float, default=0.01)
    s.add_argument("--nproc-per-node", type=int, default=1)
    s.add_argument("--nnodes", type=int, default=1)
    s.add_argument("--node-rank", type=int, default=0)
    s.add_argument("--master-addr", default="127.0.0.1")
    s.add_argument("--master-port", type=int)
    s.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 for every stage "
                                                   "(default: 2 pretrain, 3 finetune)")
    s.add_argument("--lr", type=float, help="peak learning rate (default: the case's, 1e-3 pretrain, 2e-5 finetune)")
    s.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N optimizer steps "
                                                               "(SIGTERM/SIGINT always save one)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted or failed run from its checkpoints "
                                                       "(other options come from the run)")
    s.add_argument("--hang-timeout", type=float, metavar="S",
                   help="seconds without a finished step before every rank's stacks are dumped and the run "
                        "stops (default 1800; 0 turns it off)")
    add_speed_options(s)
    s.add_argument("--profile", metavar="A-B", help="torch.profiler over optimizer steps A..B of each stage: "
                                                     "STAGE/profile/summary.txt, summary.json, trace.json.gz")
    s.add_argument("--log-all-ranks", action="store_true", help="progress and framework logs from every rank")
    s.add_argument("--tensorboard", action="store_true", help="write TensorBoard event files to RUN_DIR/tensorboard")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_run)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a small dataset in LLaVA's and MMMU's real formats")
    s.add_argument("--out", required=True)
    s.add_argument("--n-pretrain", type=int, default=256)
    s.add_argument("--n-finetune", type=int, default=256)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--vocab-size", type=int, default=1024)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    e = sub.add_parser("eval", help="evaluations")
    esub = e.add_subparsers(dest="eval_command", required=True)
    s = esub.add_parser("mmmu", help="MMMU (val) with the official scoring rules")
    s.add_argument("--model", required=True, help="run directory or Hugging Face LLaVA folder")
    s.add_argument("--data", required=True, help="MMMU folder: one subfolder per subject with validation-*.parquet")
    s.add_argument("--subjects", nargs="*")
    s.add_argument("--limit", type=int)
    s.add_argument("--generation", default="greedy", choices=["greedy", "flagperf"])
    s.add_argument("--backend")
    s.add_argument("--nproc", type=int, default=1, help="processes that split the questions (one per device)")
    s.add_argument("--out")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval_mmmu)

