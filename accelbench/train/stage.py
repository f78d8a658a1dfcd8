"""One training stage on one rank: data, model, DeepSpeed engine, the loop and its measurements."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..cases import get_preset
from ..progress import Progress
from .config import RunConfig
from .metrics import EventLog, StepRecord, rss_bytes, summarize, warmup_steps

IGNORE_INDEX = -100


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03) -> Any:
    """LLaVA's schedule: linear warm-up over 3 % of the steps, then cosine decay to 0."""
    warm = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        if rank == 0:
            self.stage_dir.mkdir(parents=True, exist_ok=True)

    # -- data --------------------------------------------------------------------------------
    def build_data(self, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
        from .data import LengthGroupedSampler, LlavaDataset, load_records, validate_records

        d = self.cfg.data
        json_path = d.pretrain_json if self.stage == "pretrain" else d.finetune_json
        records = load_records(json_path)
        template = "plain" if self.stage == "pretrain" else "vicuna_v1"
        good, bad = validate_records(records, d.image_folder, tokenizer=tokenizer, model_max_length=self.plan["MPE"],
                                     template=template, policy=self.cfg.bad_samples,
                                     max_bad_fraction=self.cfg.max_bad_fraction)
        dataset = LlavaDataset(good, d.image_folder, tokenizer, template=template,
                               image_tokens=self.preset.vision.image_tokens, image_token_id=self.image_token_id,
                               image_size=self.preset.vision.image_size, model_max_length=self.plan["MPE"])
        sampler = LengthGroupedSampler(dataset.modality_lengths, batch_size=self.plan["LBS"],
                                       world_size=self.world_size, rank=self.rank, seed=self.cfg.seed)
        info = {"json": json_path, "records": len(records), "used": len(good), "bad_records": bad.to_dict(),
                "template": template}
        return dataset, sampler, info

    # -- model -------------------------------------------------------------------------------
    def build_engine(self, ds_config: dict[str, Any]) -> tuple[Any, Any]:
        import deepspeed

        from .model import WeightPaths, build_model, enable_checkpointing, freeze_for_stage, load_projector

        w = self.cfg.weights
        weights = WeightPaths(w.get("llm"), w.get("vision_tower"), None)
        zero3 = ds_config if self.plan["zero_stage"] == 3 else None
        model = build_model(self.preset, image_token_id=self.image_token_id, pad_token_id=self.pad_token_id,
                            dtype=self.plan["dtype"], attn_implementation=self.plan["attn_implementation"],
                            device=self.device, weights=weights, zero3_config=zero3)
        projector = w.get("projector") if self.stage == "pretrain" else self.pretrain_projector()
        if projector:
            params = list(model.model.multi_modal_projector.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3 is not None):
                if self.rank == 0 or zero3 is None:
                    load_projector(model, projector)
        trainable = freeze_for_stage(model, self.stage)
        if self.plan["gradient_checkpointing"]:
            enable_checkpointing(model)
        optimizer = torch.optim.AdamW(trainable, lr=self.plan["lr"], betas=(0.9, 0.999), weight_decay=0.0)
        scheduler = cosine_with_warmup(optimizer, self.cfg.steps[self.stage])
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        return engine, model

    def pretrain_projector(self) -> str | None:
        """Finetune starts from the pretrain stage's projector when this run trained one."""
        path = Path(self.cfg.run_dir) / "pretrain" / "mm_projector.safetensors"
        if path.exists():
            return str(path)
        return self.cfg.weights.get("projector")

    # -- the loop ----------------------------------------------------------------------------
    def run(self, tokenizer: Any, events: EventLog) -> dict[str, Any]:
        import deepspeed.comm as dist

        from .data import collate
        from .ds_config import deepspeed_config
        from .flops import step_flops

        t_stage = time.perf_counter()
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.pad_token_id = tokenizer.pad_token_id
        dataset, sampler, data_info = self.build_data(tokenizer)
        p = self.plan
        ds_config = deepspeed_config(zero_stage=p["zero_stage"], micro_batch=p["LBS"], grad_accum=p["GAS"],
                                     world_size=self.world_size, dtype=p["dtype"], hidden_size=self.preset.llm.hidden)
        if self.rank == 0:
            from ..atomic import write_json_atomic

            write_json_atomic(self.stage_dir / "deepspeed_config.json", ds_config)
        engine, model = self.build_engine(ds_config)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                                             collate_fn=lambda s: collate(s, self.pad_token_id))
        steps, gas = self.cfg.steps[self.stage], p["GAS"]
        peak = self.backend.peak_flops(self.info.device_names[0] if self.info.device_names else "", p["dtype"]).flops
        records: list[StepRecord] = []
        warm = warmup_steps(steps)  # known up front, so events.jsonl marks warm-up steps as written
        batches = self._batches(loader, sampler)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        engine.train()
        progress = Progress(self.stage, total=steps, unit="step", quiet=self.rank != 0 or self.cfg.quiet)
        for step in range(steps):
            self.acc.synchronize()
            t0 = time.perf_counter()
            real = padded = samples = 0
            mflops = hflops = 0.0
            losses = []
            for _ in range(gas):
                batch = next(batches)
                inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
                if batch["pixel_values"] is not None:
                    inputs["pixel_values"] = batch["pixel_values"].to(self.device, dtype=engine.module.dtype)
                loss = engine(**inputs).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
                n_img = 0 if batch["pixel_values"] is None else int(batch["pixel_values"].shape[0])
                fl = step_flops(self.preset, batch["seq_lens"], n_img, self.stage, grad_ckpt=p["gradient_checkpointing"],
                                padded_len=int(batch["input_ids"].shape[1]))
                mflops += fl.model_flops
                hflops += fl.hardware_flops
                real += batch["real_tokens"]
                padded += batch["padded_tokens"]
                samples += len(batch["ids"])
            self.acc.synchronize()
            dt = time.perf_counter() - t0
            stats = torch.tensor([real, padded, samples, mflops, hflops, torch.stack(losses).mean().item()],
                                 dtype=torch.float64, device=self.device)
            dist.all_reduce(stats)
            loss_mean = float(stats[5]) / self.world_size
            if not math.isfinite(loss_mean):
                raise NonFiniteLoss(self.stage, step + 1, batch["ids"])
            grad_norm = engine.get_global_grad_norm()
            rec = StepRecord(
                stage=self.stage, step=step + 1, time_s=dt, real_tokens=int(stats[0]), padded_tokens=int(stats[1]),
                samples=int(stats[2]), loss=loss_mean, lr=float(engine.get_lr()[0]),
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                model_flops=float(stats[3]), hardware_flops=float(stats[4]),
                mem_allocated=self._mem("max_memory_allocated"), mem_reserved=self._mem("max_memory_reserved"),
                rss=rss_bytes(), tokens_per_s_per_proc=float(stats[0]) / dt / self.world_size,
                warmup=step < warm,
            )
            records.append(rec)
            if self.rank == 0:
                events.write(rec.to_dict())
            progress.update_to(step + 1, loss=rec.loss, tok_s=rec.tokens_per_s_per_proc)
        progress.close()
        self.save_outputs(engine, model, tokenizer)
        total = self.info.memory_bytes[0] if self.info.memory_bytes else 0
        summary = summarize(records, world_size=self.world_size, stage_wall_s=time.perf_counter() - t_stage,
                            peak_flops=peak, chips_per_board=self.info.chips_per_board,
                            flagperf_params=self.preset.nominal_params, stage=self.stage, device_total=total)
        summary["data"] = data_info
        summary["mem_device_used"] = self._device_used()
        del engine, model
        return summary

    def _batches(self, loader: Any, sampler: Any):  # noqa: ANN202 - a plain generator
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

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
            proj = engine.module.model.multi_modal_projector
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
            out = self.stage_dir / "hf_model"
            model.config.use_cache = True
            model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(out))


class NonFiniteLoss(RuntimeError):
    def __init__(self, stage: str, step: int, ids: list[str]):
        super().__init__(f"non-finite loss at {stage} step {step} (batch ids {', '.join(map(str, ids[:8]))})")
        self.stage, self.step, self.ids = stage, step, ids
