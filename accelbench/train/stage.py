"""One training stage on one rank: data, model, DeepSpeed engine, the loop and its measurements."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from ..capabilities import Adjustment
from ..cases import get_preset
from ..memory import offloaded_positions, offloads_for, replays_for
from ..progress import Progress
from . import checkpoint, faults, zero3_step
from .collector import ScheduledCollector
from .config import RunConfig
from .objective import LlavaObjective, lm_head_calls
from .metrics import (
    EventLog, GcClock, StepRecord, read_step_records, reserved_by_stream, rss_bytes, summarize, warmup_steps,
)
from .model import replay_first_layers
from .offload import ActivationOffload


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03) -> Any:
    """LLaVA's schedule, exactly as the HF Trainer builds it: linear warm-up from 0 over
    ceil(3 % of the steps), then cosine decay to 0."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * warmup_ratio), total_steps)


def step_token_scale(targets: int, device: torch.device, averaged_over: int) -> torch.Tensor:
    """The divisor of each micro-batch's target-token loss sum: ``targets`` (this rank's, in the step's
    micro-batches) summed over every rank, over ``averaged_over`` = ranks x micro-batches, since
    DeepSpeed averages gradients over ranks and divides each micro-batch's loss by the accumulation
    steps. The gradient is then that of the step's mean over all its target tokens."""
    import deepspeed.comm as dist

    count = torch.tensor(float(targets), device=device, dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return count.clamp(min=1.0) / averaged_over


def adamw(params: list[Any], lr: float) -> Any:
    """torch AdamW with LLaVA's settings, fused into one kernel per parameter chunk where torch has that
    kernel for the device (the HF Trainer's default, adamw_torch_fused), else the multi-tensor form."""
    kw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:  # "fused=True requires ... Tensors of supported devices"
        return torch.optim.AdamW(params, **kw)


class StageRunner:
    """Runs ``stage`` of ``cfg`` on this rank; rank 0 writes events and returns the summary."""

    def __init__(self, cfg: RunConfig, stage: str, backend: Any, *, rank: int, world_size: int, local_rank: int):
        self.cfg, self.stage, self.backend = cfg, stage, backend
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.plan = cfg.plans[stage]
        self.preset = get_preset(cfg.case)
        self.info = backend.device_info()
        from deepspeed.accelerator import get_accelerator

        self.acc = get_accelerator()
        dev_type = self.info.torch_device_type
        self.device = torch.device(dev_type, local_rank) if dev_type != "cpu" else torch.device("cpu")
        self.stage_dir = Path(cfg.run_dir) / stage
        self.compiled_layers = 0  # decoder layers compiled by torch.compile (kernel set "inductor")
        self.offload: ActivationOffload | None = None  # lever "offload-activations" (build_engine)
        self._peaks: dict[str, int] = {}  # the run's memory peaks (_peak)
        self._retries = 0  # the device allocator's retries so far (_alloc_retries)
        if rank == 0:
            self.stage_dir.mkdir(parents=True, exist_ok=True)

    # -- data --------------------------------------------------------------------------------
    def build_data(self, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
        from .data import LengthGroupedSampler, LlavaDataset, load_records, validate_records
        from .datacheck import read_data_check

        d = self.cfg.data
        json_path = d.pretrain_json if self.stage == "pretrain" else d.finetune_json
        records = load_records(json_path)
        template = "plain" if self.stage == "pretrain" else "vicuna_v1"
        checked = read_data_check(self.stage_dir, json_path, len(records))
        if checked is not None:  # the launcher validated the file before any rank started
            good = [records[i] for i in checked["kept"]]
            info = {k: v for k, v in checked.items() if k != "kept"}
        else:  # a node whose launcher did not write the check (older run directory)
            good, bad = validate_records(records, d.image_folder, tokenizer=tokenizer,
                                         model_max_length=self.plan["MPE"], template=template,
                                         policy=self.cfg.bad_samples, max_bad_fraction=self.cfg.max_bad_fraction)
            info = {"json": json_path, "records": len(records), "used": len(good), "bad_records": bad.to_dict(),
                    "template": template}
        dataset = LlavaDataset(good, d.image_folder, tokenizer, template=template,
                               image_tokens=self.preset.vision.image_tokens, image_token_id=self.image_token_id,
                               image_size=self.preset.vision.image_size, model_max_length=self.plan["MPE"])
        sampler = LengthGroupedSampler(dataset.modality_lengths, batch_size=self.plan["LBS"],
                                       world_size=self.world_size, rank=self.rank, seed=self.cfg.seed,
                                       balance_ranks=self.plan.get("balanced_ranks", False))
        return dataset, sampler, info

    # -- model -------------------------------------------------------------------------------
    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, Any]:
        import deepspeed

        from .kernels import apply_kernels, compile_layers, linears_as_under_zero3_default
        from .model import WeightPaths, build_model, enable_checkpointing, freeze_for_stage, load_projector

        apply_kernels(self.plan.get("kernels", "hf"))  # replaces module classes: before the build
        w = self.cfg.weights
        weights = WeightPaths(w.get("llm"), w.get("vision_tower"), None)
        zero3 = ds_config if self.plan["zero_stage"] == 3 else None
        model = build_model(self.preset, image_token_id=self.image_token_id, pad_token_id=self.pad_token_id,
                            dtype=self.plan["dtype"], attn_implementation=self.attention_kernel(),
                            device=self.device, weights=weights, zero3_config=zero3)
        projector = w.get("projector") if self.stage == "pretrain" else self.pretrain_projector()
        if projector:
            params = list(model.model.multi_modal_projector.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3 is not None):
                if self.rank == 0 or zero3 is None:
                    load_projector(model, projector)
        self.trainer_adjustments = [a.to_dict() for a in getattr(model, "_accelbench_adjustments", [])]
        trainable = freeze_for_stage(model, self.stage)
        if self.plan["gradient_checkpointing"]:
            enable_checkpointing(model, self.plan.get("recompute_layers"))
        self.compiled_layers = compile_layers(model, self.plan.get("kernels", "hf"),
                                              self.plan.get("elementwise_recompute", False))
        linears_as_under_zero3_default(model, zero3)  # image features round as in the peer
        if self.plan.get("offload_layers"):  # after compile_layers: the compiled forward runs inside its hooks
            self.offload = ActivationOffload(self.device, self.plan.get("offload_layer_bytes", 0))
            self.offload.attach(model.model.language_model.layers)
        optimizer = adamw(trainable, self.plan["lr"])
        scheduler = cosine_with_warmup(optimizer, self.cfg.steps[self.stage])
        p = self.plan
        objective = LlavaObjective(model, p.get("loss", "objective"), uniform_calls=p["zero_stage"] == 3,
                                   lm_head_calls=lm_head_calls(p.get("micro_batch_tokens") or p["LBS"] * p["MPE"]))
        engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        if p.get("lean_step"):
            reason = zero3_step.install(engine)
            if reason:  # the plan asked for it; the run says what it got instead
                self.trainer_adjustments.append(Adjustment("lean_step", True, False, f"DeepSpeed's own ZeRO-3 step: "
                                                           f"{reason}", "trainer").to_dict())
        return engine, model

    def attention_kernel(self) -> str:
        """transformers' attn_implementation for the plan: packed sdpa runs accelbench's varlen kernel."""
        name = self.plan["attn_implementation"]
        if self.plan.get("packed") and name == "sdpa":
            from .varlen_attention import register

            return register()
        return name

    def loader(self, dataset: Any, sampler: Any) -> Any:
        """Padded micro-batches, or one packed row per micro-batch when the attention takes varlen input."""
        from functools import partial

        from .data import EpochAfterEpoch, collate
        from .packing import collate_packed

        fn = partial(collate_packed if self.plan.get("packed") else collate, pad_token_id=self.pad_token_id,
                     image_token_id=self.image_token_id)
        workers = self.cfg.loader_workers
        if workers is None:  # CPU ranks already use every core for compute
            workers = 0 if self.device.type == "cpu" else min(4, max(1, (os.cpu_count() or 1) // self.world_size))
        # one iteration over every epoch: the workers load across an epoch's end as anywhere else
        return torch.utils.data.DataLoader(dataset, batch_sampler=EpochAfterEpoch(sampler), num_workers=workers,
                                           collate_fn=fn, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=2 if workers else None)

    def pretrain_projector(self) -> str | None:
        """Finetune starts from the pretrain stage's projector when this run trained one."""
        path = Path(self.cfg.run_dir) / "pretrain" / "mm_projector.safetensors"
        if path.exists():
            return str(path)
        return self.cfg.weights.get("projector")

    # -- the loop ----------------------------------------------------------------------------
    def run(self, tokenizer: Any, events: EventLog, *, stop: Any = None, watchdog: Any = None) -> dict[str, Any]:
        """Train the stage. ``stop`` (a watchdog.StopRequest) ends it with a checkpoint at the next step
        boundary; ``watchdog`` hears of every finished step."""
        # the stage's hold on the garbage collector ends with it, by return or by error
        with ScheduledCollector() as collector, GcClock() as gc_clock:
            return self._run(tokenizer, events, stop, watchdog, collector, gc_clock)

    def _run(self, tokenizer: Any, events: EventLog, stop: Any, watchdog: Any,
             collector: ScheduledCollector, gc_clock: GcClock) -> dict[str, Any]:
        import deepspeed.comm as dist

        from .ds_config import deepspeed_config
        from .flops import step_flops

        t_stage = time.perf_counter()
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.pad_token_id = tokenizer.pad_token_id
        dataset, sampler, data_info = self.build_data(tokenizer)
        p = self.plan
        ds_config = deepspeed_config(zero_stage=p["zero_stage"], micro_batch=p["LBS"], grad_accum=p["GAS"],
                                     world_size=self.world_size, dtype=p["dtype"], hidden_size=self.preset.llm.hidden,
                                     overrides=p.get("ds_overrides"))
        if self.rank == 0:
            from ..atomic import write_json_atomic

            write_json_atomic(self.stage_dir / "deepspeed_config.json", ds_config)
        engine, model = self.build_engine(ds_config)
        loader = self.loader(dataset, sampler)
        steps, gas, mbs = self.cfg.steps[self.stage], p["GAS"], p["LBS"]
        peak = self.backend.peak_flops(self.info.device_names[0] if self.info.device_names else "", p["dtype"]).flops
        records: list[StepRecord] = []
        start_step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
        resume_at = checkpoint.latest_step(self.stage_dir) if self.cfg.resume else None
        if resume_at is not None:
            state = checkpoint.load(engine, self.stage_dir, resume_at)
            start_step, epoch, elapsed_before = int(state["step"]), int(state["epoch"]), float(state["elapsed_s"])
            # samples, not batches: an out-of-memory back-off may have changed the micro-batch since
            batch_in_epoch = int(state["samples_in_epoch"]) // mbs
            if self.rank == 0:
                records = read_step_records(Path(self.cfg.run_dir) / "events.jsonl", self.stage, upto=start_step)
            data_info["resumed_from_step"] = start_step
        warm = warmup_steps(steps)  # known up front, so events.jsonl marks warm-up steps as written
        self._position = (epoch, batch_in_epoch)
        batches = self._batches(loader, sampler, epoch, batch_in_epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        engine.train()
        progress = Progress(self.stage if not self.cfg.log_all_ranks else f"{self.stage} rank {self.rank}",
                            total=steps, unit="step",
                            quiet=self.cfg.quiet or (self.rank != 0 and not self.cfg.log_all_ranks))
        progress.update_to(start_step)
        if watchdog is not None:
            watchdog.beat(self.stage, start_step)
        profiler = None
        if self.cfg.profile_steps:
            from .profiling import StepProfiler

            profiler = StepProfiler(tuple(self.cfg.profile_steps), self.stage_dir / "profile", rank=self.rank,
                                    device_type=self.device.type)
        gc_clock.take()  # the first step's gc_s starts here, not with the setup's collections
        self._retries = self._alloc_retries_total()
        collector.start()
        for step in range(start_step, steps):
            n = step + 1  # optimizer steps are counted from 1 in events, messages and faults
            if profiler is not None:
                profiler.before(n)
            # per-step seed: any random op draws the same numbers whether or not the run was resumed
            torch.manual_seed(self.cfg.seed * 1_000_003 + (0 if self.stage == "pretrain" else 500_009) + n)
            position_before = self._position
            graphs_before = self._graphs()
            self.acc.synchronize()
            if self.device.type == "cuda":  # each step's own peak; mem_allocated keeps the run's
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            collector.before_step(n)
            if self.offload is not None:
                self.offload.reset_counts()
            real = padded = samples = 0
            mflops = hflops = 0.0
            losses, ids = [], []
            try:
                with record_function("accelbench/data"):  # phases named for --profile summaries
                    step_batches = [next(batches) for _ in range(gas)]
                    # positions whose logits the objective computes, found by the collator (data.host_positions)
                    targets = [b["target_index"].numel() for b in step_batches]
                    # the step's loss is the mean over every target token of every rank and micro-batch (as
                    # the HF Trainer's average_tokens_across_devices), not a mean of per-rank means
                    scale = step_token_scale(sum(targets), self.device, self.world_size * gas)
                    replays = self._replays(step_batches)
                for micro, batch in enumerate(step_batches):
                    faults.before_micro_step(self.stage, n, rank=self.rank, micro_batch=mbs, backend=self.backend.name)
                    if p.get("recompute_table"):  # otherwise enable_checkpointing set the plan's fixed layers
                        replay_first_layers(model, replays[micro])
                    if self.offload is not None:
                        self.offload.set_layers(self._offloaded(batch, replays[micro]))
                    with record_function("accelbench/data"):
                        inputs = model_inputs(batch, self.device, model.dtype)
                    with record_function("accelbench/forward"):
                        loss = faults.poison_loss(engine(**inputs, num_items=scale), self.stage, n)
                    with record_function("accelbench/backward"):
                        engine.backward(loss)
                    if micro < gas - 1:  # the boundary step waits until the loss is known to be finite
                        with record_function("accelbench/optimizer_step"):
                            engine.step()
                    losses.append(loss.detach().float())
                    ids += batch["ids"]
                    n_img = 0 if batch["pixel_values"] is None else int(batch["pixel_values"].shape[0])
                    fl = step_flops(self.preset, batch["seq_lens"], n_img, self.stage,
                                    grad_ckpt=p["gradient_checkpointing"],
                                    recompute_layers=replays[micro],
                                    padded_len=None if p.get("packed") else int(batch["input_ids"].shape[1]),
                                    lm_head_tokens=targets[micro]
                                    if p.get("loss", "objective") == "objective" else None)
                    mflops += fl.model_flops
                    hflops += fl.hardware_flops
                    real += batch["real_tokens"]
                    padded += batch["padded_tokens"]
                    samples += len(batch["ids"])
                stop_flag = 1.0 if stop is not None and stop.signum else 0.0
                stats = torch.tensor([real, padded, samples, mflops, hflops, torch.stack(losses).sum().item(),
                                      stop_flag, self._graphs() - graphs_before], dtype=torch.float64,
                                     device=self.device)
                dist.all_reduce(stats)
                loss_mean = float(stats[5]) / (self.world_size * gas)
                if not math.isfinite(loss_mean):
                    self._non_finite(engine, n, loss_mean, ids, position_before, elapsed_before + time.perf_counter() - t_stage)
                with record_function("accelbench/optimizer_step"):
                    engine.step()
            except Exception as exc:
                if self.backend.is_oom(exc):
                    raise OutOfMemory(self.stage, n, mbs, exc) from exc
                raise
            self.acc.synchronize()
            dt = time.perf_counter() - t0
            if profiler is not None:
                profiler.after(n)
            grad_norm = engine.get_global_grad_norm()
            if float(stats[7]) > 0:  # this step compiled: outside the clock, in its gc_s
                collector.after_compile()
            # after the clock stopped: the most of any rank, so a step that waited for one rank says why
            stalls = torch.tensor([gc_clock.take(), self._alloc_retries()], dtype=torch.float64, device=self.device)
            dist.all_reduce(stalls, op=dist.ReduceOp.MAX)
            rec = StepRecord(
                stage=self.stage, step=n, time_s=dt, real_tokens=int(stats[0]), padded_tokens=int(stats[1]),
                samples=int(stats[2]), loss=loss_mean, lr=float(engine.get_lr()[0]),
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                model_flops=float(stats[3]), hardware_flops=float(stats[4]),
                mem_allocated=self._peak("max_memory_allocated"), mem_reserved=self._peak("max_memory_reserved"),
                rss=rss_bytes(), tokens_per_s_per_proc=float(stats[0]) / dt / self.world_size,
                warmup=step < warm, compiled=float(stats[7]) > 0,
                replayed_layers=max(replays),
                mem_step_peak=self._mem("max_memory_allocated") if self.device.type == "cuda" else None,
                offloaded_bytes=None if self.offload is None else self.offload.bytes_offloaded,
                offload_late=None if self.offload is None else self.offload.late,
                gc_s=float(stalls[0]), alloc_retries=int(stalls[1]) if self.device.type == "cuda" else None,
            )
            records.append(rec)
            if self.rank == 0:
                events.write(rec.to_dict())
            progress.update_to(n, loss=rec.loss, tok_s=rec.tokens_per_s_per_proc)
            stopping = float(stats[6]) > 0  # summed over ranks: every rank stops at this same step
            every = self.cfg.save_every
            if stopping or (every and n % every == 0 and n < steps):
                where = self._save(engine, n, self._position, elapsed_before + time.perf_counter() - t_stage)
                if stopping:
                    raise Interrupted(self.stage, n, stop.name if stop is not None and stop.signum else "a signal",
                                      where)
            if watchdog is not None:
                watchdog.beat(self.stage, n)
        if watchdog is not None:
            watchdog.disarm()
        progress.close()
        self.save_outputs(engine, model, tokenizer)
        total = self.info.memory_bytes[0] if self.info.memory_bytes else 0
        summary = summarize(records, world_size=self.world_size,
                            stage_wall_s=elapsed_before + time.perf_counter() - t_stage,
                            peak_flops=peak, chips_per_board=self.info.chips_per_board,
                            flagperf_params=self.preset.nominal_params, stage=self.stage, device_total=total)
        summary["data"] = data_info
        summary["trainer_adjustments"] = self.trainer_adjustments
        if self.compiled_layers:
            from .kernels import compile_counters

            summary["compiled_layers"] = {"layers": self.compiled_layers, **compile_counters()}
        summary["mem_device_used"] = self._device_used()
        if self.device.type == "cuda":
            try:  # a diagnostic: the trained stage's summary must not be lost to it
                summary["mem_reserved_by_stream"] = reserved_by_stream(torch.cuda.memory_snapshot(),
                                                                       self._stream_names(engine))
            except (RuntimeError, AttributeError, KeyError, TypeError) as exc:
                summary["mem_reserved_by_stream"] = {"error": f"{type(exc).__name__}: {exc}"}
        if resume_at is not None:
            summary["resumed_from_step"] = resume_at
        del engine, model
        return summary

    def _save(self, engine: Any, step: int, position: tuple[int, int], elapsed: float) -> str:
        epoch, batch_in_epoch = position
        state = {"step": step, "epoch": epoch, "samples_in_epoch": batch_in_epoch * self.plan["LBS"],
                 "elapsed_s": elapsed, "micro_batch": self.plan["LBS"], "grad_accum": self.plan["GAS"]}
        return checkpoint.save(engine, self.stage_dir, step, state, rank=self.rank)

    def _non_finite(self, engine: Any, step: int, loss: float, ids: list[str], position: tuple[int, int],
                    elapsed: float) -> None:
        """Every rank gets here together (the loss is all-reduced). The optimizer has not applied this
        step, so the weights are still those after step - 1: save them as the last good checkpoint."""
        import torch.distributed as tdist

        gathered: list[Any] = [None] * self.world_size
        tdist.all_gather_object(gathered, ids)
        saved = self._save(engine, step - 1, position, elapsed) if step > 1 else None
        report = self.stage_dir / f"nonfinite_step{step}.json"
        if self.rank == 0:
            from ..atomic import write_json_atomic

            write_json_atomic(report, {"stage": self.stage, "step": step, "loss": str(loss),
                                       "batch_ids": {str(r): v for r, v in enumerate(gathered)},
                                       "last_good_checkpoint": saved})
        raise NonFiniteLoss(self.stage, step, [i for v in gathered for i in v], report=str(report), checkpoint=saved)

    def _batches(self, loader: Any, sampler: Any, epoch: int, start: int):  # noqa: ANN202 - a plain generator
        """Micro-batches without end, from (epoch, batch ``start`` of that epoch), the loader's one iteration
        (``data.EpochAfterEpoch``); ``_position`` is what a checkpoint must record to continue exactly after the
        last batch handed out."""
        if start >= sampler.batches_per_rank:  # saved after an epoch's last batch
            epoch, start = epoch + 1, 0
        sampler.set_epoch(epoch, start)  # read when the loop below starts the loader's iteration
        for batch in loader:
            start += 1
            if start >= sampler.batches_per_rank:
                epoch, start = epoch + 1, 0
            self._position = (epoch, start)
            yield batch

    def _graphs(self) -> int:
        """Graphs torch.compile has made in this process so far (0 without compiled layers)."""
        if not self.compiled_layers:
            return 0
        from .kernels import compile_counters

        return compile_counters()["graphs"]

    def _replays(self, step_batches: list[dict[str, Any]]) -> list[int | None]:
        """Decoder layers each micro-batch of the step replays: with lever "batch-recompute", the plan's table row
        for this rank's micro-batch (the planner builds a table only where replays are invisible to ZeRO, so ranks
        may replay different numbers); otherwise the plan's fixed number."""
        p = self.plan
        table = p.get("recompute_table")
        if not table:
            return [p.get("recompute_layers") if p["gradient_checkpointing"] else 0] * len(step_batches)
        return [replays_for(table, b["padded_tokens"], self.preset.llm.layers) for b in step_batches]

    def _offloaded(self, batch: dict[str, Any], replayed: int | None) -> list[int]:
        """Decoder layers this micro-batch offloads (lever "offload-activations"): as many as its size needs, by
        the plan's table where it has one, among the layers it does not replay."""
        p, layers = self.plan, self.preset.llm.layers
        count = offloads_for(p.get("offload_table") or [], batch["padded_tokens"], p["offload_layers"])
        return offloaded_positions(layers, layers if replayed is None else replayed, count)

    def _stream_names(self, engine: Any) -> dict[int, str]:
        """Labels of the streams whose allocations this process makes, by handle (``reserved_by_stream``)."""
        zero = getattr(engine, "optimizer", None)
        offload = getattr(zero, "parameter_offload", None)
        streams = {"compute": torch.cuda.current_stream(self.device),
                   "ZeRO-3 parameter gathers": getattr(offload, "_DeepSpeedZeRoOffload__allgather_stream", None),
                   "ZeRO reduce-scatters": getattr(zero, "reduce_and_partition_stream", None)}
        if self.offload is not None:
            streams |= {"offload, to the host": self.offload.to_host,
                        "offload, back to the device": self.offload.to_device}
        return {int(s.cuda_stream): name for name, s in streams.items() if s is not None}

    def _alloc_retries_total(self) -> int:
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def _alloc_retries(self) -> int:
        """The device allocator's retries since the last call."""
        total = self._alloc_retries_total()
        retries, self._retries = total - self._retries, total
        return retries

    def _peak(self, what: str) -> int:
        """The run's peak so far: the device counters restart every step."""
        self._peaks[what] = max(self._peaks.get(what, 0), self._mem(what))
        return self._peaks[what]

    def _mem(self, what: str) -> int:
        if self.device.type == "cuda":
            return int(getattr(torch.cuda, what)(self.device))
        return rss_bytes()

    def _device_used(self) -> list[list[int]] | None:
        usage = self.backend.memory_usage()
        return [list(u) for u in usage] if usage else None

    def save_outputs(self, engine: Any, model: Any, tokenizer: Any) -> None:
        """Pretrain: the projector (finetune's starting point). Finetune: a consolidated HF folder
        in safetensors when MMMU will evaluate it."""
        from safetensors.torch import save_file

        if self.stage == "pretrain":
            proj = model.model.multi_modal_projector
            if self.rank == 0:
                state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in proj.state_dict().items()}
                save_file(state, str(self.stage_dir / "mm_projector.safetensors"))
            return
        if not self.cfg.eval_mmmu:
            return
        if self.plan["zero_stage"] == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict()
        if self.rank == 0:
            state = {k.removeprefix("llava."): v for k, v in state.items()}  # the objective wraps the model
            out = self.stage_dir / "hf_model"
            model.config.use_cache = True
            model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(out))


ATTENTION_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The tensors the objective takes, on the device (packed batches add positions and cu_seq_lens; batches
    collated with the image token add the positions found on the host, ``data.host_positions``)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                              "labels": batch["labels"].to(device, non_blocking=True)}
    for key in ("image_index", "target_index"):
        if key in batch:
            inputs[key] = batch[key].to(device, non_blocking=True)
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    if batch["pixel_values"] is not None:
        inputs["pixel_values"] = batch["pixel_values"].to(device, dtype=dtype, non_blocking=True)
    for key in ATTENTION_KWARGS:
        if key in batch:
            value = batch[key]
            inputs[key] = value.to(device, non_blocking=True) if torch.is_tensor(value) else value
    return inputs


class TrainingFault(RuntimeError):
    """A fault the launcher knows how to report (``kind``) or recover from."""

    kind = "error"

    def report(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if isinstance(v, (str, int, float, list, type(None)))}


class NonFiniteLoss(TrainingFault):
    kind = "nonfinite"

    def __init__(self, stage: str, step: int, ids: list[str], *, report: str | None = None,
                 checkpoint: str | None = None):
        kept = f"; last good checkpoint {checkpoint}" if checkpoint else "; no checkpoint (first step)"
        where = f"; batch ids in {report}" if report else ""
        super().__init__(f"non-finite loss at {stage} step {step} (batch ids {', '.join(map(str, ids[:8]))})"
                         f"{where}{kept}")
        self.stage, self.step, self.ids = stage, step, list(map(str, ids))
        self.batch_ids_file, self.checkpoint = report, checkpoint


class OutOfMemory(TrainingFault):
    kind = "oom"

    def __init__(self, stage: str, step: int, micro_batch: int, error: BaseException):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        super().__init__(f"out of memory at {stage} step {step} with micro-batch {micro_batch}: {first}")
        self.stage, self.step, self.micro_batch, self.error = stage, step, micro_batch, first


class Interrupted(TrainingFault):
    kind = "interrupted"

    def __init__(self, stage: str, step: int, signal_name: str, checkpoint: str):
        super().__init__(f"{signal_name} at {stage} step {step}: checkpoint saved in {checkpoint}")
        self.stage, self.step, self.signal, self.checkpoint = stage, step, signal_name, checkpoint
