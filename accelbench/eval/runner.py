"""Evaluate a Hugging Face LLaVA folder (or a run directory's finetuned model) on MMMU."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AccelbenchError


def resolve_model_dir(path: str | Path) -> Path:
    p = Path(path)
    for candidate in (p, p / "finetune" / "hf_model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise AccelbenchError(f"--model {str(p)!r} is neither a Hugging Face LLaVA folder nor a run directory "
                          f"with finetune/hf_model (run `accelbench run` with the finetune stage first)")


def evaluate_model_dir(model_dir: str | Path, data_dir: str | Path, *, out_path: str | Path,
                       generation: str = "greedy", limit: int | None = None, subjects: list[str] | None = None,
                       backend: Any = None, quiet: bool = False, batch_size: int = 8, nproc: int = 1) -> dict[str, Any]:
    """Evaluate and write ``out_path`` (mmmu.json). With ``nproc`` > 1 the ranks split the questions
    (each writes its own part and resume log) and the answers are gathered and scored as one run."""
    model_dir = resolve_model_dir(model_dir)
    if nproc < 1:
        raise AccelbenchError(f"--nproc {nproc} is impossible: give 1 or more processes")
    job = {"model_dir": str(model_dir), "data_dir": str(data_dir), "out_path": str(out_path),
           "generation": generation, "limit": limit, "subjects": subjects,
           "backend": None if backend is None else backend.name, "quiet": quiet, "batch_size": batch_size}
    if nproc == 1:
        return _evaluate_share(job, rank=0, world_size=1, local_rank=0)
    import json

    from ..atomic import write_json_atomic
    from ..train.launch import LaunchSpec, launch
    from .mmmu import merge_results

    launch(LaunchSpec(nproc_per_node=nproc), _rank_main, job)
    parts = [json.loads(rank_out_path(out_path, r).read_text(encoding="utf-8")) for r in range(nproc)]
    report = merge_results(parts)
    write_json_atomic(out_path, report)
    return report


def rank_out_path(out_path: str | Path, rank: int) -> Path:
    """mmmu.json -> mmmu.rank1.json (its resume log: mmmu.rank1.partial.jsonl)."""
    p = Path(out_path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def _rank_main(job: dict[str, Any]) -> None:
    import os

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    _evaluate_share({**job, "out_path": str(rank_out_path(job["out_path"], rank)), "quiet": job["quiet"] or rank != 0},
                    rank=rank, world_size=world, local_rank=local)


def _evaluate_share(job: dict[str, Any], *, rank: int, world_size: int, local_rank: int) -> dict[str, Any]:
    import os

    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from ..backends import load_registry
    from ..train.images import make_image_transform
    from .mmmu import evaluate, load_mmmu

    questions, skipped = load_mmmu(job["data_dir"], subjects=job["subjects"], limit=job["limit"])
    backend = load_registry().select(job["backend"]) if job["backend"] else None
    device = "cpu"
    if backend is not None and backend.device_info().torch_device_type != "cpu":
        device = f"{backend.device_info().torch_device_type}:{local_rank}"
    elif world_size > 1:  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    from ..train.model import DTYPES

    dtype = DTYPES[backend.precision().default_dtype] if backend is not None and device != "cpu" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(job["model_dir"], dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    transform = make_image_transform(model.config.vision_config.image_size, "pad")
    share = len(questions[rank::world_size])
    progress = None if job["quiet"] else _progress_printer(share)
    with torch.inference_mode():
        return evaluate(model, tokenizer, transform, questions, out_path=job["out_path"],
                        generation=job["generation"], batch_size=job["batch_size"], progress=progress,
                        skipped=skipped, rank=rank, world_size=world_size)


def _progress_printer(total: int):  # noqa: ANN202
    from ..progress import Progress

    bar = Progress("mmmu", total=total, unit="q")

    def update(done: int, _total: int) -> None:
        bar.update_to(done)

    return update
