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
                       backend: Any = None, quiet: bool = False, batch_size: int = 8) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from ..train.images import make_image_transform
    from .mmmu import evaluate, load_mmmu

    model_dir = resolve_model_dir(model_dir)
    questions, skipped = load_mmmu(data_dir, subjects=subjects, limit=limit)
    device = "cpu"
    if backend is not None and backend.device_info().torch_device_type != "cpu":
        device = f"{backend.device_info().torch_device_type}:0"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    transform = make_image_transform(model.config.vision_config.image_size, "pad")
    progress = None if quiet else _progress_printer(len(questions))
    with torch.inference_mode():
        report = evaluate(model, tokenizer, transform, questions, out_path=out_path, generation=generation,
                          batch_size=batch_size, progress=progress, skipped=skipped)
    return report


def _progress_printer(total: int):  # noqa: ANN202
    from ..progress import Progress

    bar = Progress("mmmu", total=total, unit="q")

    def update(done: int, _total: int) -> None:
        bar.update_to(done)

    return update
