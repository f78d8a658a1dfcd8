"""The peer: LLaVA-1.5 training through Hugging Face's ``Trainer`` on DeepSpeed (LLaVA's and FlagPerf's path).

What users run today is LLaVA's ``train.py``: an HF ``Trainer`` subclass (``LLaVATrainer``) handed a
DeepSpeed config through ``TrainingArguments(deepspeed=...)``.  This script is that path with everything
that is not the training framework held equal to accelbench:

* model: accelbench's ``build_model`` + ``freeze_for_stage`` (same preset, same random init seed),
  ``attn_implementation="sdpa"`` (``--attn eager``: a rounding variant for the loss check), activation
  checkpointing switched on by the Trainer's own argument;
* data: the same records (accelbench's ``prepare_data``: the synthetic set, or ``--data``), validated,
  tokenized and padded by accelbench's ``LlavaDataset`` + ``collate`` (pad to the longest in the batch,
  as LLaVA's ``DataCollatorForSupervisedDataset`` does);
* order: LLaVA's ``group_by_modality_length`` through a ``Trainer`` subclass overriding
  ``_get_train_sampler`` (as ``LLaVATrainer`` does), backed by accelbench's seeded ``LengthGroupedSampler``;
* DeepSpeed config: the very dict accelbench writes (``ds_config.deepspeed_config``), with the same ZeRO-3
  bucket sizes and persistence threshold accelbench's plan chooses (``--llava-zero3-buckets`` and
  ``--llava-persistence`` for LLaVA's own);
* optimizer / schedule: the Trainer's own (``optim`` default = torch AdamW, fused where torch has it; ``--optim
  adamw_torch``: foreach, another rounding variant;
  ``lr_scheduler_type="cosine"``, warm-up ratio 0.03; weight decay 0, LLaVA's).  The config has no
  ``"optimizer"`` entry, so the Trainer creates the torch optimizer and DeepSpeed never JIT-builds FusedAdam.
  (``Trainer(optimizers=(opt, sched))`` is *not* used: under DeepSpeed, transformers' ``deepspeed_init``
  discards a passed optimizer and builds one from ``args.optim``, while keeping the passed scheduler,
  which then drives the discarded optimizer: the learning rate would never change.)

Measurement (rank 0 prints and writes it): a ``TrainerCallback`` times each optimizer step between
synchronised ``on_step_end`` events (so the Trainer's own per-step work -- batch fetch, NaN check,
logging -- is inside the window, as the batch fetch is inside accelbench's), counts real (non-pad) and
padded tokens of every micro-batch, the loss, and analytic FLOPs (``flops.step_flops``), and summarises
them with accelbench's ``metrics.summarize`` (same warm-up exclusion, same tokens/s-per-process formula).

Single process: ``python benchmarks/hf_peer.py --case tiny --stage finetune --steps 20``.
Several: ``python -m torch.distributed.run --nproc-per-node N benchmarks/hf_peer.py ...``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

STAGES = ("pretrain", "finetune")


# --------------------------------------------------------------------------- arguments and environment


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="tiny", help="tiny, llava1.5-7b or llava1.5-13b")
    p.add_argument("--stage", default="finetune", choices=STAGES)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--mbs", type=int, help="micro-batch per process (default: accelbench's for the case)")
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seq", type=int, default=2048, help="model_max_length")
    p.add_argument("--data", help="folder with LLaVA JSON files, images/, tokenizer/ (default: accelbench's synthetic set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ds-config", help="DeepSpeed JSON merged over the shared config, as `accelbench run --ds-config`")
    p.add_argument("--llava-zero3-buckets", action="store_true",
                   help="LLaVA's ZeRO-3 bucket sizes (hidden²) instead of the 5e8-element ones accelbench's plan uses")
    p.add_argument("--llava-persistence", action="store_true",
                   help="LLaVA's ZeRO-3 persistence threshold (10·hidden) instead of the one by which accelbench's "
                        "plan keeps the frozen vision tower whole")
    p.add_argument("--backend", help="accelbench backend whose DeepSpeed accelerator to install (default: auto)")
    # two documented options that change only rounding: the peer's own rounding variants for the loss check
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="attn_implementation (default sdpa, the peer's; eager: transformers' matmul-softmax-matmul)")
    p.add_argument("--optim", default="adamw_torch_fused", choices=("adamw_torch_fused", "adamw_torch"),
                   help="TrainingArguments.optim (default adamw_torch_fused, the Trainer's; adamw_torch: "
                        "torch's foreach AdamW)")
    p.add_argument("--workers", type=int, default=0,
                   help="dataloader_num_workers (default 0, as accelbench; LLaVA's scripts use 4)")
    p.add_argument("--schedule", default="hf", choices=("hf", "accelbench"),
                   help="hf (default): the Trainer's cosine schedule, warm-up from lr 0; accelbench: accelbench's "
                        "cosine_with_warmup (diagnostic only: shows the two paths then train identically)")
    p.add_argument("--out", default="runs/hf_peer", help="Trainer output_dir; peer_summary.json is written here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "gas", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.mbs is not None and args.mbs < 1:
        p.error("--mbs must be >= 1")
    return args


def single_process_env() -> None:
    """Without a launcher, DeepSpeed looks for MPI: give it a one-process world instead."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from accelbench.train.launch import free_port

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def install_accelerator(backend_name: str | None) -> Any:
    """The backend's DeepSpeed accelerator (on CPU: no shared-memory comm JIT), exactly as accelbench does."""
    from accelbench.backends import load_registry

    backend = load_registry().select(backend_name)
    accelerator = backend.deepspeed_accelerator()
    if accelerator is not None:
        from deepspeed.accelerator import set_accelerator

        set_accelerator(accelerator)
    return backend


def quiet_logs() -> None:
    """The same filters accelbench's worker applies: per-step deprecation noise only."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).*deprecated",
                            category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- data


class ModalityLengthSampler:
    """LLaVA's ``LengthGroupedSampler(group_by_modality=True)``: the *global* index order.

    LLaVA's sampler yields one index order for all ranks and lets accelerate deal the batches out
    (batch k to rank k % world); its megabatch is ``world_size * gradient_accumulation_steps`` batches.
    The order itself is accelbench's ``LengthGroupedSampler.global_order`` (LLaVA's algorithm with every
    shuffle seeded), so both paths see the same batches.
    """

    def __init__(self, modality_lengths: Sequence[int], batch_size: int, world_size: int, seed: int) -> None:
        from accelbench.train.data import LengthGroupedSampler

        self.inner = LengthGroupedSampler(modality_lengths, batch_size=batch_size, world_size=world_size,
                                          rank=0, seed=seed, group_by_modality=True)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.inner.global_order())

    def __len__(self) -> int:
        return self.inner.batches_per_rank * self.inner.batch_size * self.inner.world_size


class PeerCollator:
    """accelbench's ``collate`` (right-pad to the longest), plus the counts the meter needs under ``meta``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from accelbench.train.data import collate

        b = collate(samples, self.pad_token_id)
        inputs: dict[str, Any] = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
        if b["pixel_values"] is not None:
            inputs["pixel_values"] = b["pixel_values"]
        n_images = 0 if b["pixel_values"] is None else int(b["pixel_values"].shape[0])
        inputs["meta"] = {"seq_lens": b["seq_lens"], "n_images": n_images, "real": b["real_tokens"],
                          "padded": b["padded_tokens"], "samples": len(samples),
                          "padded_len": int(b["input_ids"].shape[1])}
        return inputs


def build_dataset(data: dict[str, Any], tokenizer: Any, stage: str, preset: Any, seq: int) -> Any:
    """Exactly accelbench's StageRunner.build_data, minus the sampler."""
    from accelbench.train.data import LlavaDataset, load_records, validate_records

    json_path = data["pretrain_json"] if stage == "pretrain" else data["finetune_json"]
    template = "plain" if stage == "pretrain" else "vicuna_v1"
    good, _bad = validate_records(load_records(json_path), data["image_folder"], tokenizer=tokenizer,
                                  model_max_length=seq, template=template, policy="skip", max_bad_fraction=0.01)
    return LlavaDataset(good, data["image_folder"], tokenizer, template=template,
                        image_tokens=preset.vision.image_tokens,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        image_size=preset.vision.image_size, model_max_length=seq)


def shared_data(opts: Any, image_size: int, vocab: int) -> dict[str, Any]:
    """accelbench's ``prepare_data`` (same cache folder as ``accelbench run``), one rank at a time.

    accelbench synthesises in its launcher before the ranks start; torchrun starts every rank of the peer
    at once, so a file lock keeps them from writing the same cache folder together.
    """
    import fcntl

    from accelbench.train.run import cache_dir, prepare_data

    lock_dir = cache_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".hf_peer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return prepare_data(opts, image_size, vocab)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- measurement


class StepMeter:
    """Per-micro-batch counts (fed by the Trainer subclass) and per-step records (closed by the callback)."""

    def __init__(self, preset: Any, stage: str, grad_ckpt: bool, device: Any, world_size: int) -> None:
        self.preset, self.stage, self.grad_ckpt = preset, stage, grad_ckpt
        self.device, self.world_size = device, world_size
        self.records: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self.real = self.padded = self.samples = 0
        self.mflops = self.hflops = 0.0
        self.losses: list[Any] = []

    def micro_batch(self, meta: dict[str, Any]) -> None:
        from accelbench.train.flops import step_flops

        fl = step_flops(self.preset, meta["seq_lens"], meta["n_images"], self.stage, grad_ckpt=self.grad_ckpt,
                        padded_len=meta["padded_len"])
        self.mflops += fl.model_flops
        self.hflops += fl.hardware_flops
        self.real += meta["real"]
        self.padded += meta["padded"]
        self.samples += meta["samples"]

    def loss(self, value: Any) -> None:
        self.losses.append(value.detach().float())

    def close_step(self, step: int, dt: float, lr: float) -> Any:
        """All-reduce this step's counts (outside the timed window, as accelbench does) and record it."""
        import torch
        import torch.distributed as dist

        from accelbench.train.metrics import StepRecord, rss_bytes

        # The Trainer's reported loss: sum of training_step's returns over the step's micro-batches.
        loss = torch.stack(self.losses).sum().item() if self.losses else float("nan")
        stats = torch.tensor([self.real, self.padded, self.samples, self.mflops, self.hflops, loss],
                             dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(stats)
        mem = self._mem()
        rec = StepRecord(stage=self.stage, step=step, time_s=dt, real_tokens=int(stats[0]),
                         padded_tokens=int(stats[1]), samples=int(stats[2]),
                         loss=float(stats[5]) / self.world_size, lr=lr, grad_norm=None,
                         model_flops=float(stats[3]), hardware_flops=float(stats[4]),
                         mem_allocated=mem[0], mem_reserved=mem[1], rss=rss_bytes(),
                         tokens_per_s_per_proc=float(stats[0]) / dt / self.world_size)
        self.records.append(rec)
        self._reset()
        return rec

    def _mem(self) -> tuple[int, int]:
        import torch

        from accelbench.train.metrics import rss_bytes

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), int(torch.cuda.max_memory_reserved(self.device))
        rss = rss_bytes()
        return rss, rss


def make_callback(meter: StepMeter, quiet: bool) -> Any:
    from deepspeed.accelerator import get_accelerator
    from transformers import TrainerCallback

    acc = get_accelerator()

    class StepTimer(TrainerCallback):
        """Synchronised wall time of every optimizer step."""

        def __init__(self) -> None:
            self.t0: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.t0 is None:  # first step: from its first micro-batch on (later: from the last step's end)
                acc.synchronize()
                self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            acc.synchronize()
            dt = time.perf_counter() - (self.t0 or time.perf_counter())
            scheduler = kw.get("lr_scheduler")
            lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else float("nan")
            rec = meter.close_step(state.global_step, dt, lr)
            if not quiet and state.is_world_process_zero:
                print(f"[peer] step {rec.step}/{state.max_steps} {rec.time_s:.3f}s loss={rec.loss:.4f} "
                      f"tok_s={rec.tokens_per_s_per_proc:.0f}", flush=True)
            acc.synchronize()
            self.t0 = time.perf_counter()  # the next window includes the Trainer's own between-step work

    return StepTimer()


class VisionEveryBatch:
    """LLaVA runs the vision tower on every batch: its dataset gives a text-only sample a blank image in
    multimodal mode, and its model keeps none of that image's features. transformers' Llava skips the tower
    without ``pixel_values``, so under ZeRO-3 a rank with a text-only micro-batch would skip the tower's
    parameter all-gathers while the other ranks wait in them. When ``blank`` is set, this runs the tower and
    projector on one blank image with weight 0 right before the language model, where Llava runs them for
    an image batch, so every rank calls the same modules in the same order."""

    def __init__(self, llava: Any) -> None:
        self.llava, self.blank = llava, False
        llava.model.language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True)

    def _before_language_model(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self.blank:
            return None
        from accelbench.train.objective import with_blank_image

        return args, {**kwargs, "inputs_embeds": with_blank_image(self.llava, kwargs["inputs_embeds"])}


def make_trainer_class() -> type:
    from transformers import Trainer

    class LlavaPeerTrainer(Trainer):
        """LLaVA's ``LLaVATrainer`` as far as training goes: its ``group_by_modality_length`` sampler.

        ``training_step`` only takes the counts off the batch for the meter and records the loss.
        """

        def __init__(self, *args: Any, modality_lengths: Sequence[int], sampler_seed: int, meter: StepMeter,
                     schedule: str = "hf", zero_stage: int = 3, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.modality_lengths, self.sampler_seed, self.meter = list(modality_lengths), sampler_seed, meter
            self.schedule = schedule
            # as accelbench (objective's uniform_calls): only ZeRO-3 needs every rank to call the same modules
            self.vision_every_batch = VisionEveryBatch(self.model) if zero_stage == 3 else None

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.schedule == "hf" or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            from accelbench.train.stage import cosine_with_warmup

            self.lr_scheduler = cosine_with_warmup(optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            # LLaVATrainer: LengthGroupedSampler(train_batch_size, world_size * gradient_accumulation_steps,
            # lengths=modality_lengths, group_by_modality=True)
            return ModalityLengthSampler(self.modality_lengths, batch_size=self.args.train_batch_size,
                                         world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                                         seed=self.sampler_seed)

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            self.meter.micro_batch(inputs.pop("meta"))
            if self.vision_every_batch is not None:
                self.vision_every_batch.blank = "pixel_values" not in inputs
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.meter.loss(loss)
            return loss

    return LlavaPeerTrainer


# --------------------------------------------------------------------------- the run


def peer_overrides(args: argparse.Namespace, zero_stage: int, preset: Any) -> dict[str, Any]:
    """The same DeepSpeed settings accelbench's plan gives DeepSpeed: its ZeRO-3 buckets, the persistence threshold
    that keeps the frozen vision tower whole, then --ds-config."""
    from accelbench.memory import tower_threshold
    from accelbench.train.ds_config import load_overrides, tuned_overrides

    whole_tower = zero_stage == 3 and not args.llava_persistence
    return tuned_overrides(zero_stage == 3 and not args.llava_zero3_buckets,
                           load_overrides(args.ds_config) if args.ds_config else None,
                           tower_threshold=tower_threshold(preset) if whole_tower else None)


def training_arguments(args: argparse.Namespace, *, mbs: int, lr: float, dtype: str, ds_config: dict[str, Any],
                       on_cuda: bool) -> Any:
    """LLaVA-1.5's script options (scripts/v1_5/*.sh) as TrainingArguments, on transformers 5.x old and new."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    kw: dict[str, Any] = dict(
        output_dir=args.out, per_device_train_batch_size=mbs, gradient_accumulation_steps=args.gas,
        max_steps=args.steps, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="cosine",
        max_grad_norm=1.0, bf16=dtype == "bf16", deepspeed=ds_config, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=args.workers, remove_unused_columns=False, optim=args.optim, save_strategy="no",
        report_to="none", disable_tqdm=True,
    )
    # warm-up ratio 0.03: `warmup_ratio` in older 5.x, a fractional `warmup_steps` in newer
    kw["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = 0.03
    kw["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    if on_cuda:
        kw["tf32"] = True  # LLaVA's scripts pass --tf32 True
    else:
        # accelerate counts CPU processes only with use_cpu (else it reports world size 1 and the Trainer's batch
        # arithmetic disagrees with the DeepSpeed config), and transformers refuses bf16 (a CPU with native bf16:
        # AVX512-BF16, AMX) without it; the engine is still DeepSpeed's.
        kw["use_cpu"] = True
    if "eval_strategy" in fields:
        kw["eval_strategy"] = "no"
    return TrainingArguments(**kw)


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    single_process_env()
    quiet_logs()
    backend = install_accelerator(args.backend)

    import torch
    from transformers import AutoTokenizer

    from accelbench.cases import get_preset
    from accelbench.plan import STAGE_DEFAULTS
    from accelbench.train.ds_config import deepspeed_config
    from accelbench.train.metrics import summarize
    from accelbench.train.model import build_model, freeze_for_stage
    from accelbench.train.run import TINY_MBS, RunOptions

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    info = backend.device_info()
    on_cuda = info.torch_device_type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(info.torch_device_type, local_rank) if on_cuda else torch.device(info.torch_device_type)

    preset = get_preset(args.case)
    defaults = STAGE_DEFAULTS[args.stage]
    mbs = args.mbs or (TINY_MBS[args.stage] if args.case == "tiny" else defaults.micro_batch)
    lr = dict(preset.stage_lr).get(args.stage, defaults.lr)
    dtype = "bf16" if backend.precision().bf16 else "fp32"
    zero_stage = defaults.zero_stage

    # Same records as `accelbench run` (same synthetic cache folder, or --data).
    vocab = preset.llm.vocab if args.case == "tiny" else 1024
    data = shared_data(RunOptions(case=args.case, data=args.data, seed=args.seed), preset.vision.image_size, vocab)
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    t_stage = time.perf_counter()  # as accelbench's StageRunner.run: data, model, engine, loop
    dataset = build_dataset(data, tokenizer, args.stage, preset, args.seq)

    ds_config = deepspeed_config(zero_stage=zero_stage, micro_batch=mbs, grad_accum=args.gas, world_size=world,
                                 dtype=dtype, hidden_size=preset.llm.hidden,
                                 overrides=peer_overrides(args, zero_stage, preset))
    if not on_cuda and world > 1:
        # CPU, several processes: accelerate sets the gloo group up itself (use_cpu) but never DeepSpeed's
        # comm layer, whose world size zero.Init reads: start it first, as DeepSpeed documents for
        # launchers other than its own (accelbench does the same in every rank).
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.dist_backend)
    # TrainingArguments first: with ZeRO-3 it is what makes model construction partitioned (HF's documented order).
    targs = training_arguments(args, mbs=mbs, lr=lr, dtype=dtype, ds_config=ds_config, on_cuda=on_cuda)

    torch.manual_seed(args.seed)  # same random init as accelbench's rank (seeded right before its model build)
    model = build_model(preset, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=tokenizer.pad_token_id, dtype=dtype, attn_implementation=args.attn,
                        device=device, zero3_config=ds_config if zero_stage == 3 else None)
    freeze_for_stage(model, args.stage)

    meter = StepMeter(preset, args.stage, grad_ckpt=True, device=device, world_size=world)
    trainer = make_trainer_class()(
        model=model, args=targs, train_dataset=dataset, data_collator=PeerCollator(tokenizer.pad_token_id),
        callbacks=[make_callback(meter, args.quiet)], modality_lengths=dataset.modality_lengths,
        sampler_seed=args.seed, meter=meter, schedule=args.schedule, zero_stage=zero_stage,
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    wall = time.perf_counter() - t_stage

    records = meter.records
    from accelbench.train.metrics import warmup_steps

    for r in records[:warmup_steps(len(records))]:
        r.warmup = True
    peak = backend.peak_flops(info.device_names[0] if info.device_names else "", dtype).flops
    summary = summarize(records, world_size=world, stage_wall_s=wall, peak_flops=peak,
                        chips_per_board=info.chips_per_board, flagperf_params=preset.nominal_params,
                        stage=args.stage, device_total=info.memory_bytes[0] if info.memory_bytes else 0)
    summary.update({
        "path": "hf_trainer", "case": args.case, "stage": args.stage, "world_size": world, "micro_batch": mbs,
        "grad_accum": args.gas, "dtype": dtype, "zero_stage": zero_stage, "lr": lr, "optim": str(targs.optim),
        "attn_implementation": args.attn, "data": {k: data[k] for k in ("finetune_json", "pretrain_json", "tokenizer")},
        "lr_schedule": args.schedule, "versions": versions(), "engine": type(trainer.model_wrapped).__name__,
        "deepspeed_config": trainer.accelerator.state.deepspeed_plugin.deepspeed_config,
        "losses": [r.loss for r in records], "step_times": [r.time_s for r in records],
        "real_tokens": [r.real_tokens for r in records], "padded_tokens": [r.padded_tokens for r in records],
    })
    if rank != 0:
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not math.isfinite(summary.get("tokens_per_s_per_proc", float("nan"))):
        print("peer: non-finite throughput", file=sys.stderr)
    print(f"PEER tokens/s per process (steady): {summary['tokens_per_s_per_proc']:.1f}  "
          f"loss after {summary['steps']} steps: {summary['loss_last']:.4f}  ({out / 'peer_summary.json'})",
          flush=True)
    return summary


def versions() -> dict[str, str]:
    import accelerate
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "accelerate": accelerate.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
